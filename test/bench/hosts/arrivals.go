package main

import (
	"sort"
	"sync"
	"time"

	toolscache "k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// arrivalLog records when each version (name@resourceVersion) of a watched object arrived.
// The benchmark and the manager each keep one; comparing them shows how far the manager's
// cache lags behind a watch that has nothing else to do.
type arrivalLog struct {
	mu sync.Mutex
	at map[string]time.Time
}

func newArrivalLog() *arrivalLog { return &arrivalLog{at: map[string]time.Time{}} }

func (a *arrivalLog) handler() toolscache.ResourceEventHandlerFuncs {
	record := func(o any) {
		obj, ok := o.(client.Object)
		if !ok {
			return
		}
		now := time.Now()
		a.mu.Lock()
		a.at[obj.GetName()+"@"+obj.GetResourceVersion()] = now
		a.mu.Unlock()
	}
	return toolscache.ResourceEventHandlerFuncs{AddFunc: record, UpdateFunc: func(_, n any) { record(n) }}
}

func (a *arrivalLog) snapshot() map[string]time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make(map[string]time.Time, len(a.at))
	for k, v := range a.at {
		out[k] = v
	}
	return out
}

// cacheLag is, for every object version both logs saw, how much later the manager saw it.
func cacheLag(bench, manager map[string]time.Time) []time.Duration {
	var lags []time.Duration
	for k, b := range bench {
		if m, ok := manager[k]; ok {
			lags = append(lags, max(m.Sub(b), 0))
		}
	}
	sort.Slice(lags, func(i, j int) bool { return lags[i] < lags[j] })
	return lags
}
