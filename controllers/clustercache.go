package controllers

import (
	"context"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/cluster-api/controllers/clustercache"
	"sigs.k8s.io/cluster-api/controllers/remote"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
)

// SetupClusterCache gives Anvil's controllers clients for the workload clusters, as CAPI's
// providers set it up (CAPD's main): connections from the clusters' kubeconfig Secrets, a
// Node cache, no caching of ConfigMaps and Secrets. Remediation uses it to taint Nodes.
func SetupClusterCache(ctx context.Context, mgr ctrl.Manager, watchFilterValue string) (clustercache.ClusterCache, error) {
	secrets, err := client.New(mgr.GetConfig(), client.Options{HTTPClient: mgr.GetHTTPClient(), Scheme: mgr.GetScheme(),
		Cache: &client.CacheOptions{Reader: mgr.GetCache()}})
	if err != nil {
		return nil, err
	}
	return clustercache.SetupWithManager(ctx, mgr, clustercache.Options{
		SecretClient: secrets,
		Client: clustercache.ClientOptions{QPS: 20, Burst: 30, UserAgent: remote.DefaultClusterAPIUserAgent("capanvil-controller-manager"),
			Cache: clustercache.ClientCacheOptions{DisableFor: []client.Object{&corev1.ConfigMap{}, &corev1.Secret{}}}},
		WatchFilterValue: watchFilterValue,
	}, controller.Options{MaxConcurrentReconciles: 10})
}
