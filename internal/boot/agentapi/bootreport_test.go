package agentapi

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/types"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

type recordedReports struct {
	mu      sync.Mutex
	reports map[types.NamespacedName][]BootReport
}

func (r *recordedReports) BootReported(_ context.Context, host types.NamespacedName, _ string, rep BootReport) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reports[host] = append(r.reports[host], rep)
	return nil
}

// TestBootReports: the registered agent gets a report token while installing; only that token
// reports boots, only for its own host, and it opens none of the agent's calls.
func TestBootReports(t *testing.T) {
	e := newEnv(t)
	rec := &recordedReports{reports: map[types.NamespacedName][]BootReport{}}
	srv, err := NewServer(ServerOptions{Tokens: e.issuer, Backend: e.backend, BootReports: rec,
		ReportTokens: func(host types.NamespacedName, attempt string) (string, error) {
			return e.issuer.Issue(host, attempt, time.Hour)
		}})
	if err != nil {
		t.Fatal(err)
	}
	e.http.Close()
	e.http = httptest.NewServer(srv)
	t.Cleanup(e.http.Close)

	tok, sess := e.token(hostA, "a1"), newSession()
	if code, body := e.do(http.MethodGet, PathReportToken, tok, sess, nil); code != http.StatusForbidden {
		t.Fatalf("report token before registration: %d %s", code, body)
	}
	if code := e.register(tok, sess); code != http.StatusOK {
		t.Fatalf("register: %d", code)
	}
	code, body := e.do(http.MethodGet, PathReportToken, tok, sess, nil)
	var resp ReportTokenResponse
	if code != http.StatusOK || json.Unmarshal(body, &resp) != nil || resp.Token == "" {
		t.Fatalf("report token: %d %s", code, body)
	}
	report := resp.Token

	// The report token reports; the agent's own token does not.
	if code, body := e.do(http.MethodPost, PathBootReport, report, "", BootReport{Slot: infrav1.SlotB, Good: true}); code != http.StatusNoContent {
		t.Fatalf("boot report: %d %s", code, body)
	}
	if code, _ := e.do(http.MethodPost, PathBootReport, tok, "", BootReport{Slot: infrav1.SlotB, Good: true}); code != http.StatusForbidden {
		t.Fatalf("a boot token reported a boot: %d", code)
	}
	// The report token opens none of the agent's calls, with or without a session.
	for _, path := range []string{PathTask, PathBootstrap, PathReportToken} {
		if code, _ := e.do(http.MethodGet, path, report, sess, nil); code == http.StatusOK {
			t.Fatalf("the report token opened %s", path)
		}
	}
	// Bad reports and forged tokens.
	for _, bad := range []any{BootReport{Slot: "C", Good: true}, BootReport{Slot: infrav1.SlotA, Failed: "X"}, "not a report"} {
		if code, _ := e.do(http.MethodPost, PathBootReport, report, "", bad); code != http.StatusBadRequest {
			t.Fatalf("report %+v: %d, want 400", bad, code)
		}
	}
	if code, _ := e.do(http.MethodPost, PathBootReport, report[:len(report)-2]+"xx", "", BootReport{Slot: infrav1.SlotA}); code != http.StatusUnauthorized {
		t.Fatalf("forged report token: %d", code)
	}
	rec.mu.Lock()
	got := rec.reports[hostA]
	others := len(rec.reports) - 1
	rec.mu.Unlock()
	if len(got) != 1 || got[0].Slot != infrav1.SlotB || !got[0].Good || others != 0 {
		t.Fatalf("backend saw %+v (and %d other hosts)", got, others)
	}
	e.assertNoSecrets(tok, sess, report)
	if strings.Contains(string(body), "report:") {
		t.Fatal("the response names the token's attempt")
	}
}
