// Command anvil is Anvil's operator tool. Today it has one subcommand, demo, which runs Anvil
// on an embedded management plane against emulated servers (see README.md).
package main

import (
	"fmt"
	"os"

	"github.com/go-logr/logr"
	ctrl "sigs.k8s.io/controller-runtime"
)

func main() {
	if len(os.Args) < 2 || os.Args[1] != "demo" {
		fmt.Fprintln(os.Stderr, "usage: anvil demo")
		os.Exit(2)
	}
	// Controller logs would drown the demo's own progress; errors surface through it.
	ctrl.SetLogger(logr.Discard())
	if err := runDemo(os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
}
