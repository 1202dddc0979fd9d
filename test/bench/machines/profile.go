package main

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// profileAPIServer records a CPU profile of the kube-apiserver (its /debug/pprof, on by
// default; the benchmark's client is envtest's admin) for the given duration, starting after
// delay, into dir/apiserver-<phase>.pprof. It runs in the background and reports where it
// wrote, or why it could not, on progress.
func profileAPIServer(ctx context.Context, cfg *rest.Config, delay, d time.Duration, dir, phase string, progress func(string, ...any)) {
	go func() {
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		path := filepath.Join(dir, "apiserver-"+phase+".pprof")
		if err := fetchProfile(ctx, cfg, d, path); err != nil {
			progress("kube-apiserver profile (%s): %v", phase, err)
			return
		}
		progress("kube-apiserver CPU profile of %s of %s written to %s", d, phase, path)
	}()
}

func fetchProfile(ctx context.Context, cfg *rest.Config, d time.Duration, path string) error {
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	raw, err := cs.Discovery().RESTClient().Get().AbsPath("/debug/pprof/profile").
		Param("seconds", strconv.Itoa(int(d.Seconds()))).Timeout(d + time.Minute).DoRaw(ctx)
	if err != nil {
		return err
	}
	return os.WriteFile(path, raw, 0o600)
}
