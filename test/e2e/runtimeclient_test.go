package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"

	runtimecatalog "sigs.k8s.io/cluster-api/api/runtime/catalog"
	runtimehooksv1 "sigs.k8s.io/cluster-api/api/runtime/hooks/v1alpha1"
	runtimev1 "sigs.k8s.io/cluster-api/api/runtime/v1beta2"
	runtimeclient "sigs.k8s.io/cluster-api/exp/runtime/client"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// extensionCaller is the runtime client the suite's Cluster API controllers use with the
// InPlaceUpdates gate on. Cluster API's own client (ExtensionConfig registry, discovery) is in
// its internal/runtime/client package, which another module cannot import; this one calls
// one extension, set by the test that serves it, the way that client does: JSON over HTTPS to
// the handler's path, a Failure status turned into an error. With no extension set it reports
// none, and Cluster API rolls out as it does with the gate off.
type extensionCaller struct {
	catalog *runtimecatalog.Catalog

	mu   sync.Mutex
	url  string // base URL of the extension server; "" when none
	http *http.Client
	// handlers maps each hook's name to the handler name serving it.
	handlers map[string]string
}

var _ runtimeclient.Client = (*extensionCaller)(nil)

func newExtensionCaller() *extensionCaller {
	c := runtimecatalog.New()
	if err := runtimehooksv1.AddToCatalog(c); err != nil {
		panic(err)
	}
	return &extensionCaller{catalog: c}
}

// serve points the client at an extension until the returned func is called.
func (e *extensionCaller) serve(url string, hc *http.Client, handlers map[string]string) func() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.url, e.http, e.handlers = url, hc, handlers
	return func() {
		e.mu.Lock()
		defer e.mu.Unlock()
		e.url, e.http, e.handlers = "", nil, nil
	}
}

func (e *extensionCaller) WarmUp(*runtimev1.ExtensionConfigList) error { return nil }
func (e *extensionCaller) IsReady() bool                               { return true }
func (e *extensionCaller) Discover(context.Context, *runtimev1.ExtensionConfig) (*runtimev1.ExtensionConfig, error) {
	return nil, errors.New("discovery is not supported by the test runtime client")
}
func (e *extensionCaller) Register(*runtimev1.ExtensionConfig) error   { return nil }
func (e *extensionCaller) Unregister(*runtimev1.ExtensionConfig) error { return nil }

func (e *extensionCaller) GetAllExtensions(_ context.Context, hook runtimecatalog.Hook, _ client.Object) ([]string, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if name, ok := e.handlers[runtimecatalog.HookName(hook)]; ok && e.url != "" {
		return []string{name}, nil
	}
	return nil, nil
}

func (e *extensionCaller) CallAllExtensions(ctx context.Context, hook runtimecatalog.Hook, forObject client.Object, req runtimehooksv1.RequestObject, resp runtimehooksv1.ResponseObject) error {
	names, err := e.GetAllExtensions(ctx, hook, forObject)
	if err != nil {
		return err
	}
	for _, name := range names {
		if err := e.CallExtension(ctx, hook, forObject, name, req, resp); err != nil {
			return err
		}
	}
	if len(names) == 0 {
		resp.SetStatus(runtimehooksv1.ResponseStatusSuccess)
	}
	return nil
}

func (e *extensionCaller) CallExtension(ctx context.Context, hook runtimecatalog.Hook, _ client.Object, name string, req runtimehooksv1.RequestObject, resp runtimehooksv1.ResponseObject, _ ...runtimeclient.CallExtensionOption) error {
	e.mu.Lock()
	url, hc := e.url, e.http
	e.mu.Unlock()
	if url == "" {
		return fmt.Errorf("failed to call extension handler %q: no extension is served", name)
	}
	gvh, err := e.catalog.GroupVersionHook(hook)
	if err != nil {
		return err
	}
	gvk, err := e.catalog.GroupVersionKind(req)
	if err != nil {
		return err
	}
	req.GetObjectKind().SetGroupVersionKind(gvk)
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, url+"/"+strings.TrimPrefix(runtimecatalog.GVHToPath(gvh, name), "/"), bytes.NewReader(body))
	if err != nil {
		return err
	}
	hreq.Header.Set("Content-Type", "application/json")
	r, err := hc.Do(hreq)
	if err != nil {
		return fmt.Errorf("failed to call extension handler %q: %w", name, err)
	}
	defer func() { _ = r.Body.Close() }()
	out, err := io.ReadAll(r.Body)
	if err != nil {
		return err
	}
	if r.StatusCode != http.StatusOK {
		return fmt.Errorf("failed to call extension handler %q: HTTP %d: %s", name, r.StatusCode, out)
	}
	if err := json.Unmarshal(out, resp); err != nil {
		return fmt.Errorf("failed to call extension handler %q: %w", name, err)
	}
	if resp.GetStatus() == runtimehooksv1.ResponseStatusFailure {
		return fmt.Errorf("failed to call extension handler %q: got failure response with message %v", name, resp.GetMessage())
	}
	return nil
}
