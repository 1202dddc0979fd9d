package main

import (
	"fmt"
	"io"
	"strings"
	"time"
)

// steps runs the lab's steps in order, prints each with its duration, and remembers them for
// the closing timeline. A step that fails stops the lab, and the error names it.
type steps struct {
	out     io.Writer
	began   time.Time
	records []stepRecord
}

type stepRecord struct {
	name     string
	at, took time.Duration // since the lab began; how long the step took
}

func newSteps(out io.Writer) *steps { return &steps{out: out, began: time.Now()} }

// run runs one step.
func (s *steps) run(name string, do func() error) error {
	start := time.Now()
	fmt.Fprintf(s.out, "\n==> %s\n", name)
	if err := do(); err != nil {
		return fmt.Errorf("step %q: %w", name, err)
	}
	took := time.Since(start)
	s.records = append(s.records, stepRecord{name: name, at: start.Sub(s.began), took: took})
	fmt.Fprintf(s.out, "    done in %s\n", round(took))
	return nil
}

// printTimeline prints every step with when it started and how long it took.
func (s *steps) printTimeline() {
	fmt.Fprintf(s.out, "\nTimeline (total %s)\n", round(time.Since(s.began)))
	width := 0
	for _, r := range s.records {
		width = max(width, len(r.name))
	}
	width = min(width, 100)
	for _, r := range s.records {
		name := r.name
		if len(name) > width {
			name = name[:width-1] + "…"
		}
		fmt.Fprintf(s.out, "  %8s  %-*s %8s  %s\n", "+"+round(r.at).String(), width, name, round(r.took), bar(r.took))
	}
}

func round(d time.Duration) time.Duration {
	if d > 10*time.Second {
		return d.Round(100 * time.Millisecond)
	}
	return d.Round(10 * time.Millisecond)
}

// bar draws one # per second (at most 40).
func bar(d time.Duration) string {
	return strings.Repeat("#", min(40, int(d/time.Second)))
}
