package inplace

import (
	"fmt"

	runtimecatalog "sigs.k8s.io/cluster-api/api/runtime/catalog"
	runtimehooksv1 "sigs.k8s.io/cluster-api/api/runtime/hooks/v1alpha1"
	"sigs.k8s.io/cluster-api/exp/runtime/server"
)

// Handler names, as Cluster API's ExtensionConfig status lists them
// (<name>.<ExtensionConfig name>).
const (
	CanUpdateMachineHandler    = "anvil-can-update-machine"
	CanUpdateMachineSetHandler = "anvil-can-update-machineset"
	UpdateMachineHandler       = "anvil-update-machine"
)

// ServerOptions configure the extension's HTTPS server.
type ServerOptions struct {
	// Host and Port it listens on (Port 0: server.DefaultPort, 9443).
	Host string
	Port int
	// CertDir holds tls.crt and tls.key; Cluster API verifies them against the
	// ExtensionConfig's caBundle.
	CertDir string
}

// NewServer returns the Runtime Extension server with e's handlers, to add to a manager (it
// serves on every replica, not only the leader, like a webhook server).
func NewServer(e *Extension, opts ServerOptions) (*server.Server, error) {
	catalog := runtimecatalog.New()
	if err := runtimehooksv1.AddToCatalog(catalog); err != nil {
		return nil, err
	}
	srv, err := server.New(server.Options{Catalog: catalog, Host: opts.Host, Port: opts.Port, CertDir: opts.CertDir})
	if err != nil {
		return nil, err
	}
	for _, h := range []server.ExtensionHandler{
		{Hook: runtimehooksv1.CanUpdateMachine, Name: CanUpdateMachineHandler, HandlerFunc: e.CanUpdateMachine},
		{Hook: runtimehooksv1.CanUpdateMachineSet, Name: CanUpdateMachineSetHandler, HandlerFunc: e.CanUpdateMachineSet},
		{Hook: runtimehooksv1.UpdateMachine, Name: UpdateMachineHandler, HandlerFunc: e.UpdateMachine},
	} {
		if err := srv.AddExtensionHandler(h); err != nil {
			return nil, fmt.Errorf("registering %s: %w", h.Name, err)
		}
	}
	return srv, nil
}
