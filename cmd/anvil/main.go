// Command anvil is Anvil's operator tool. Today it has one subcommand, demo, which runs the
// Anvil API on an embedded management plane; the lab (emulated servers carried through the
// whole lifecycle) will extend it.
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 || os.Args[1] != "demo" {
		fmt.Fprintln(os.Stderr, "usage: anvil demo")
		os.Exit(2)
	}
	if err := runDemo(os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
}
