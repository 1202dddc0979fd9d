package agentapi

import (
	"context"
	"errors"
	"net/http"
	"strings"

	"k8s.io/apimachinery/pkg/types"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/token"
)

// Boot reports: after an A/B install the installed OS, not the agent, knows whether the new
// slot came up healthy. Its health gate (internal/disk's anvil-mark-good) reports each boot:
//
//	GET  /agent/v1/report-token  (agent token)  → ReportTokenResponse, while provisioning
//	POST /agent/v1/boot-report   (report token) BootReport → 204
//
// A report token is a boot token whose attempt is ReportAttemptPrefix + the install's
// attempt: it can report the boot state of that one host and nothing else (the agent API's
// other calls refuse it, as their attempt never carries the prefix), and it expires with
// every token. The agent writes it to the config drive; the OS holds it, not the logs.
const (
	PathReportToken = PathPrefix + "report-token"
	PathBootReport  = PathPrefix + "boot-report"
	// ReportAttemptPrefix marks the attempt of a report token.
	ReportAttemptPrefix = "report:"
)

// ReportTokenResponse carries the report token for the installed OS.
type ReportTokenResponse struct {
	Token string `json:"token"`
}

// BootReport is what the installed OS's health gate says after a boot.
type BootReport struct {
	// Slot the OS runs from.
	Slot infrav1.Slot `json:"slot"`
	// Good is true once the gate passed and the slot is marked good.
	Good bool `json:"good"`
	// Failed is the slot GRUB gave up on (its tries ran out), if any.
	Failed infrav1.Slot `json:"failed,omitempty"`
}

// Validate checks the report's slots.
func (r BootReport) Validate() error {
	valid := func(s infrav1.Slot) bool { return s == infrav1.SlotA || s == infrav1.SlotB }
	if !valid(r.Slot) {
		return errors.New("slot must be A or B")
	}
	if r.Failed != "" && !valid(r.Failed) {
		return errors.New("failed must be empty, A or B")
	}
	return nil
}

// BootReporter receives boot reports (the provisioning backend implements it).
type BootReporter interface {
	// BootReported records a report for the host's install attempt.
	BootReported(ctx context.Context, host types.NamespacedName, attempt string, r BootReport) error
}

// ReportTokenIssuer mints a report token for a host and attempt (token.Issuer.Issue with
// the longest lifetime: the OS reports for as long as an upgrade's tries can take).
type ReportTokenIssuer func(host types.NamespacedName, attempt string) (string, error)

func (s *Server) reportToken(w http.ResponseWriter, r *http.Request, a Agent, view HostView) {
	if view.State != infrav1.HostStateProvisioning && view.State != infrav1.HostStateUpgrading {
		writeError(w, http.StatusForbidden, "forbidden", "a report token is issued only while the host is installing")
		return
	}
	tok, err := s.opts.ReportTokens(a.Host, ReportAttemptPrefix+a.Attempt)
	if err != nil {
		s.opts.Log.Error(err, "agent API: issuing a report token", "host", a.Host.String())
		writeError(w, http.StatusServiceUnavailable, "unavailable", "cannot issue a report token, retry")
		return
	}
	writeJSON(w, http.StatusOK, ReportTokenResponse{Token: tok})
}

func (s *Server) bootReport(w http.ResponseWriter, r *http.Request) {
	tok, ok := bearer(r)
	if !ok {
		writeError(w, http.StatusUnauthorized, "unauthorized", "a report token is required")
		return
	}
	claims, err := s.opts.Tokens.Verify(tok)
	if err != nil {
		if errors.Is(err, token.ErrBadSignature) {
			s.event(SecurityEvent{Kind: EventForgedToken, RemoteAddr: r.RemoteAddr, Message: err.Error()})
		}
		writeError(w, http.StatusUnauthorized, "unauthorized", "invalid report token")
		return
	}
	attempt, isReport := strings.CutPrefix(claims.Attempt, ReportAttemptPrefix)
	if !isReport {
		writeError(w, http.StatusForbidden, "forbidden", "a boot token cannot report boots; use the report token")
		return
	}
	var report BootReport
	if err := decode(w, r, 1<<10, &report); err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	if err := report.Validate(); err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	if err := s.opts.BootReports.BootReported(r.Context(), claims.Host, attempt, report); err != nil {
		s.backendError(w, err, Agent{Host: claims.Host, Attempt: attempt, TokenID: claims.ID}, "boot report")
		return
	}
	s.opts.Log.Info("boot reported", "host", claims.Host.String(), "attempt", attempt, "slot", report.Slot,
		"good", report.Good, "failed", report.Failed)
	w.WriteHeader(http.StatusNoContent)
}

// ReportToken asks for the report token of this install (for the config drive).
func (c *Client) ReportToken(ctx context.Context) (string, error) {
	var out ReportTokenResponse
	err := c.call(ctx, http.MethodGet, PathReportToken, nil, &out)
	return out.Token, err
}
