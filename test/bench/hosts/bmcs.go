package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/redfish"
)

// bmcsReady is what the BMC child reports once every BMC listens.
type bmcsReady struct {
	Stats string   // loopback address of the stats endpoint
	Addrs []string // host:port of BMC i
	CAPEM []byte   // CA of the BMCs' certificate (TLS only)
}

// bmcStats is the BMC child's answer to GET /stats.
type bmcStats struct {
	// PerBMC is each BMC's request count (any method), in BMC order.
	PerBMC []uint64
	// ByMethod sums all BMCs' requests by method.
	ByMethod map[string]uint64
	// Sessions is the number of Redfish sessions open across all BMCs.
	Sessions int
}

// bmcPassword is BMC i's password: every host has its own credentials Secret.
func bmcPassword(i int) string { return fmt.Sprintf("bench-pw-%d", i) }

// bmcOptions describes emulated server i: the three DMTF mockups in turn, with distinct
// identities and sizes, as the emulator's own scale test does.
func bmcOptions(i, maxSessions int) redfish.BMCOptions {
	mockups := redfish.Mockups()
	return redfish.BMCOptions{
		Mockup:      mockups[i%len(mockups)],
		Identity:    redfish.NewIdentity(i),
		Hardware:    redfish.Hardware{Processors: 1 + i%4, MemoryGiB: 64 << (i % 3)},
		Username:    "admin",
		Password:    bmcPassword(i),
		MaxSessions: maxSessions,
	}
}

// runBMCs serves spec.BMCs emulated Redfish BMCs until ctx ends.
func runBMCs(ctx context.Context, spec childSpec) error {
	srv, err := redfish.NewServer(redfish.ServerOptions{TLS: spec.TLS})
	if err != nil {
		return err
	}
	defer srv.Close()
	bmcs := make([]*redfish.BMC, 0, spec.BMCs)
	ready := bmcsReady{CAPEM: srv.CACertPEM()}
	for i := range spec.BMCs {
		b, err := srv.AddBMC(bmcOptions(i, spec.MaxSessions))
		if err != nil {
			return fmt.Errorf("BMC %d: %w", i, err)
		}
		bmcs = append(bmcs, b)
		ready.Addrs = append(ready.Addrs, b.Addr())
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		st := bmcStats{PerBMC: make([]uint64, len(bmcs)), ByMethod: map[string]uint64{}}
		for i, b := range bmcs {
			r := b.Requests()
			st.PerBMC[i] = r.Total()
			st.ByMethod["GET"] += r.Get
			st.ByMethod["POST"] += r.Post
			st.ByMethod["PATCH"] += r.Patch
			st.ByMethod["DELETE"] += r.Delete
			st.ByMethod["other"] += r.Other
			st.Sessions += b.Sessions()
		}
		_ = json.NewEncoder(w).Encode(st)
	})
	if ready.Stats, err = serveStats(ctx, mux); err != nil {
		return err
	}
	if err := writeReady(spec.ReadyFile, ready); err != nil {
		return err
	}
	<-ctx.Done()
	return nil
}
