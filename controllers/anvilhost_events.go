package controllers

import (
	"strings"
	"unicode/utf8"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
)

// maxEventNote is the API server's limit on an Event's note.
const maxEventNote = 1024

// foldEvents turns what happened in one reconcile into at most one Event, since every Event
// is an API write: a healthy host's onboarding is one "Registering → Inspecting → Available;
// powered on to match the spec". Consecutive state changes become one path; other events
// follow in order. The reason is the first warning's (and the Event a warning), else the
// state the host reached, else the first event's.
func foldEvents(events []hoststate.Event) (hoststate.Event, bool) {
	if len(events) == 0 {
		return hoststate.Event{}, false
	}
	var out hoststate.Event
	var parts []string
	var path []string // the state changes in progress: path[0] → path[1] → …
	flush := func() {
		if len(path) > 0 {
			parts = append(parts, strings.Join(path, " → "))
			path = nil
		}
	}
	for _, e := range events {
		switch {
		case e.To != "" && len(path) > 0 && path[len(path)-1] == string(e.From):
			path = append(path, string(e.To))
		case e.To != "":
			flush()
			path = []string{string(e.From), string(e.To)}
		default:
			flush()
			parts = append(parts, e.Message)
		}
		if e.To != "" {
			if out.From == "" {
				out.From = e.From
			}
			out.To = e.To
		}
		if e.Warning && !out.Warning {
			out.Warning, out.Reason = true, e.Reason
		}
	}
	flush()
	if out.Reason == "" {
		out.Reason = events[0].Reason
		if out.To != "" {
			out.Reason = string(out.To)
		}
	}
	out.Message = truncate(strings.Join(parts, "; "), maxEventNote)
	return out, true
}

// truncate shortens s to at most n bytes without splitting a character.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	const ellipsis = "…"
	cut := n - len(ellipsis)
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + ellipsis
}
