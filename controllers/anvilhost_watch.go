package controllers

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"maps"
	"sync"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/predicate"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/hoststate"
)

// hostChangedByOthers passes the host updates this controller must act on: spec changes
// (generation; a claim, maintenance, deletion), annotations (sync-power, reboot) and labels
// other than the hardware labels it sets itself. Its own writes (status, finalizer, hardware
// labels) pass nothing, so they do not reconcile each host a second time; timed requeues pace
// everything else.
func hostChangedByOthers() predicate.Predicate {
	return predicate.Or(predicate.GenerationChangedPredicate{}, annotationsChangedByOthers(), foreignLabelsChanged{})
}

// foreignLabelsChanged is LabelChangedPredicate without the hardware labels.
type foreignLabelsChanged struct{ predicate.Funcs }

func (foreignLabelsChanged) Update(e event.UpdateEvent) bool {
	if e.ObjectOld == nil || e.ObjectNew == nil {
		return false
	}
	return !maps.Equal(foreignLabels(e.ObjectOld.GetLabels()), foreignLabels(e.ObjectNew.GetLabels()))
}

func foreignLabels(labels map[string]string) map[string]string {
	out := make(map[string]string, len(labels))
	for k, v := range labels {
		if !hoststate.IsHardwareLabel(k) {
			out[k] = v
		}
	}
	return out
}

// caPools parses each CA bundle Secret once per version: a fleet usually shares one bundle,
// and parsing it for every reconcile of every host would cost CPU and garbage for nothing.
// Entries are replaced when the Secret changes; one is kept per Secret ever seen.
type caPools struct {
	mu       sync.Mutex
	bySecret map[types.NamespacedName]parsedCA
}

type parsedCA struct {
	resourceVersion string
	pool            *x509.CertPool
	digest          string // of the PEM: what bmc.Target.CADigest wants
}

// pool returns the certificates under ca.crt of s, and a digest of them.
func (c *caPools) pool(s *corev1.Secret) (*x509.CertPool, string, error) {
	key := types.NamespacedName{Namespace: s.Namespace, Name: s.Name}
	c.mu.Lock()
	defer c.mu.Unlock()
	if p, ok := c.bySecret[key]; ok && p.resourceVersion == s.ResourceVersion && s.ResourceVersion != "" {
		return p.pool, p.digest, nil
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(s.Data["ca.crt"]) {
		return nil, "", fmt.Errorf("CA bundle Secret %q has no PEM certificate under key ca.crt", s.Name)
	}
	if c.bySecret == nil {
		c.bySecret = map[types.NamespacedName]parsedCA{}
	}
	sum := sha256.Sum256(s.Data["ca.crt"])
	parsed := parsedCA{resourceVersion: s.ResourceVersion, pool: pool, digest: hex.EncodeToString(sum[:])}
	c.bySecret[key] = parsed
	return parsed.pool, parsed.digest, nil
}
