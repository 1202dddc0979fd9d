package redfish_test

import (
	"fmt"
	"net/http"
	"strings"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/machine"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/vbmc/redfish"
)

// A lab starts emulated servers and reacts when one is powered on to boot from the network.
func Example() {
	srv, err := redfish.NewServer(redfish.ServerOptions{})
	if err != nil {
		panic(err)
	}
	defer srv.Close()

	server := machine.New(machine.Config{})
	booted := make(chan machine.Event, 1)
	defer server.Subscribe(func(e machine.Event) {
		if e.Kind == machine.EventBoot {
			booted <- e // the lab would start a VM here, PXE-booting if e.Boot.Target says so
		}
	})()

	bmc, err := srv.AddBMC(redfish.BMCOptions{Machine: server, Identity: redfish.NewIdentity(1)})
	if err != nil {
		panic(err)
	}

	// What a provisioning controller does: one-time PXE, then power on.
	do := func(method, path, body string) {
		req, _ := http.NewRequest(method, bmc.URL()+path, strings.NewReader(body))
		req.SetBasicAuth("admin", "password")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			panic(err)
		}
		resp.Body.Close()
	}
	do("PATCH", "/redfish/v1/Systems/1", `{"Boot": {"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"}}`)
	do("POST", "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset", `{"ResetType": "On"}`)

	e := <-booted
	fmt.Println(e.Boot.Target, e.Boot.Enabled, server.Power(), server.BootOverride().Enabled)
	fmt.Println(bmc.Requests().Total(), "requests")
	// Output:
	// Pxe Once On Disabled
	// 2 requests
}
