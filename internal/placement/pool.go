package placement

import (
	"cmp"
	"slices"
	"sync"

	"k8s.io/apimachinery/pkg/types"

	infrav1 "github.com/anvil-metal/cluster-api-provider-anvil/api/v1alpha1"
)

// Pool holds the claimable hosts of every namespace in the order Choose prefers them
// (smallest first, then by name), fed from the informer's events. A claim then walks the
// pool from the front and stops at the first host that fits, instead of listing and scoring
// the whole fleet: with thousands of hosts and machines that listing made claiming
// quadratic. The hosts are the informer's own objects, shared and read-only.
//
// The pool is a hint, like the cache it mirrors: a claim is still an update carrying the
// host's resourceVersion. Its lock guards the slices only, never a claim; choices run in
// parallel under the read lock.
type Pool struct {
	mu          sync.RWMutex
	byNamespace map[string]*namespacePool
}

type namespacePool struct {
	ordered []poolEntry          // by (size, name)
	byName  map[string]poolEntry // name -> its entry, as ordered
}

type poolEntry struct {
	size [3]int64
	host *infrav1.AnvilHost
}

func comparePoolEntries(a, b poolEntry) int {
	for i := range a.size {
		if c := cmp.Compare(a.size[i], b.size[i]); c != 0 {
			return c
		}
	}
	return cmp.Compare(a.host.Name, b.host.Name)
}

// Set records h as it is now: in the pool when claimable, out of it otherwise.
func (p *Pool) Set(h *infrav1.AnvilHost) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ns := p.namespace(h.Namespace)
	ns.remove(h.Name)
	if !Claimable(h) {
		return
	}
	e := poolEntry{size: sizeKey(h), host: h}
	i, _ := slices.BinarySearchFunc(ns.ordered, e, comparePoolEntries)
	ns.ordered = slices.Insert(ns.ordered, i, e)
	ns.byName[h.Name] = e
}

// Delete forgets the host key.
func (p *Pool) Delete(key types.NamespacedName) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ns := p.byNamespace[key.Namespace]; ns != nil {
		ns.remove(key.Name)
	}
}

// Version returns the resourceVersion of the host key if it is in the pool (claimable, as
// far as the informer has seen); ok is false otherwise.
func (p *Pool) Version(key types.NamespacedName) (resourceVersion string, ok bool) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	ns := p.byNamespace[key.Namespace]
	if ns == nil {
		return "", false
	}
	e, ok := ns.byName[key.Name]
	if !ok {
		return "", false
	}
	return e.host.ResourceVersion, true
}

// Choose is Choose over the pool's hosts in namespace: the same host, found by walking them
// in preference order. Spreading needs req.ClusterLoad: the pool holds no claimed hosts to
// count. When no host fits, Result.Rejected is left empty: explaining why
// takes every host into account, not only the claimable ones (use Choose on all of them).
func (p *Pool) Choose(namespace string, req Request) Result {
	p.mu.RLock()
	defer p.mu.RUnlock()
	ns := p.byNamespace[namespace]
	if ns == nil {
		return Result{Rejected: map[string]int{}}
	}
	res := Result{Total: len(ns.ordered), Rejected: map[string]int{}}
	spreading := req.SpreadCluster != "" && req.FailureDomain == ""
	bestLoad := 0
	for _, e := range ns.ordered {
		if reject(e.host, req) != "" {
			continue
		}
		if !spreading {
			res.Host = e.host // the first that fits is the smallest, then the first by name
			return res
		}
		// Spreading: the least loaded failure domain wins, then size and name, which the
		// walk's order gives. A host in a domain holding none of the cluster's hosts cannot
		// be beaten.
		l := req.ClusterLoad[e.host.Labels[failureDomainLabel(req)]]
		if res.Host == nil || l < bestLoad {
			res.Host, bestLoad = e.host, l
		}
		if bestLoad == 0 {
			return res
		}
	}
	return res
}

func (p *Pool) namespace(name string) *namespacePool {
	if p.byNamespace == nil {
		p.byNamespace = map[string]*namespacePool{}
	}
	ns := p.byNamespace[name]
	if ns == nil {
		ns = &namespacePool{byName: map[string]poolEntry{}}
		p.byNamespace[name] = ns
	}
	return ns
}

func (ns *namespacePool) remove(name string) {
	e, ok := ns.byName[name]
	if !ok {
		return
	}
	delete(ns.byName, name)
	if i, found := slices.BinarySearchFunc(ns.ordered, e, comparePoolEntries); found {
		ns.ordered = slices.Delete(ns.ordered, i, i+1)
	}
}
