package main

import (
	"bytes"
	"context"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/netns"
)

// TestLab runs `make demo` as make test does, so the README's first command cannot rot: every
// lifecycle step must happen, in order, and the final table must show the end states.
func TestLab(t *testing.T) {
	if os.Getenv("ANVIL_LAB_VM") != "" {
		// Cluster API's controllers register their informers once per process.
		t.Skip("ANVIL_LAB_VM is set: TestLabVM runs the lab in this process instead")
	}
	toRepoRoot(t)
	quietLogs()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	var out bytes.Buffer
	opts := defaultLabOptions()
	opts.Out = &out
	if err := runLab(ctx, opts); err != nil {
		t.Fatalf("lab failed: %v\n%s", err, out.String())
	}
	text := out.String()
	defer func() {
		if t.Failed() {
			t.Log(text)
		}
	}()
	steps := []string{
		"spec.bmc.address: Invalid value",
		"OS up from slot A; config drive: provider-id anvil://anvil-demo/lab-server-",
		"user-data runs kubeadm init",
		"user-data runs kubeadm join",
		"was wiped (metadata) and is Available again",
		"runs http://127.0.0.1", // ImageUpToDate after the committed upgrade: "slot B runs …/v2.img"
		"kept its node; DATA on lab-server-",
		"failed its health gate in slot",
		"kept its node; DATA on lab-server-",
		"has the out-of-service taint",
		"was power-cycled through its BMC and booted again",
		"is in maintenance: \"needs repair",
		"replaced it on lab-server-",
		"is Retired and powered off",
		"Timeline (total",
	}
	last := 0
	for _, want := range steps {
		i := strings.Index(text[last:], want)
		if i < 0 {
			t.Fatalf("lab output lacks %q after offset %d", want, last)
		}
		last += i
	}
	checkNetworkBoots(t, text, opts)
	final := text[strings.LastIndex(text, "$ kubectl get anvilhosts"):strings.LastIndex(text, "Timeline (total")]
	if n := len(regexp.MustCompile(`(?m)^lab-server-\d+\s+Available\s+Off`).FindAllString(final, -1)); n != opts.Servers-1 {
		t.Errorf("final table has %d Available hosts powered off, want %d:\n%s", n, opts.Servers-1, final)
	}
	if n := len(regexp.MustCompile(`(?m)^lab-server-\d+\s+Retired\s+Off`).FindAllString(final, -1)); n != 1 {
		t.Errorf("final table has %d Retired hosts powered off, want 1:\n%s", n, final)
	}
}

// networkBoots is the lab's closing account of the network boots.
var networkBoots = regexp.MustCompile(`Network boots over (\S+): (\d+), (\d+) with a lease from Anvil's DHCP \(([\d.]+)\); TFTP ([^;]+); ` +
	`(\d+) loaded the agent \(kernel ([\d.]+) MiB, initramfs ([\d.]+) MiB\), (\d+) went on to the disk, (\d+) failed\. ` +
	`Anvil's DHCP sent (\d+) ACKs, its TFTP served (\d+) files\.`)

// checkNetworkBoots asserts that, where the lab has a provisioning network, every server that
// booted by PXE took a lease from Anvil's DHCP, loaded iPXE over TFTP and the agent's kernel
// and initramfs over HTTP — and that Anvil's own DHCP and TFTP servers counted as much.
func checkNetworkBoots(t *testing.T, text string, opts labOptions) {
	t.Helper()
	if err := netns.Check(); err != nil {
		if !strings.Contains(text, "no provisioning network (") {
			t.Errorf("without network namespaces (%v) the lab does not say it falls back", err)
		}
		return
	}
	if !regexp.MustCompile(`(?m)^    lab-server-\d+ network boot \(UEFI\): DHCP lease 10\.77\.0\.\d+/24 from 10\.77\.0\.1, TFTP \S+ \(\d+ KiB\), script, kernel`).MatchString(text) {
		t.Errorf("the progress shows no network boot with a lease, TFTP, script and kernel")
	}
	// Every server whose installed OS came up had network-booted the agent before.
	for _, up := range regexp.MustCompile(`(?m)^    (lab-server-\d+): OS up from slot`).FindAllStringSubmatchIndex(text, -1) {
		server := text[up[2]:up[3]]
		if !strings.Contains(text[:up[0]], "    "+server+" network boot (UEFI): DHCP lease 10.77.0.") &&
			!strings.Contains(text[:up[0]], "    "+server+" (qemu VM) powered on: network boot once") {
			t.Errorf("%s's OS came up without a network boot over the provisioning network before it", server)
		}
	}
	m := networkBoots.FindStringSubmatch(text)
	if m == nil {
		t.Fatalf("the lab's output has no account of its network boots")
	}
	n := func(i int) int {
		v, err := strconv.Atoi(m[i])
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	boots, fromAnvil, agent, failed, acks, tftpServed := n(2), n(3), n(6), n(10), n(11), n(12)
	// Each machine's install, each wipe and each repair boots the agent.
	if minAgent := opts.ControlPlanes + opts.Workers; agent < minAgent {
		t.Errorf("%d network boots loaded the agent, want at least %d (one per machine): %s", agent, minAgent, m[0])
	}
	if failed != 0 || fromAnvil != boots {
		t.Errorf("every network boot must take its lease from Anvil's DHCP (%s): %s", m[4], m[0])
	}
	// Two exchanges per boot (the PXE ROM's, then iPXE's), one TFTP transfer.
	if acks < 2*boots || tftpServed < boots {
		t.Errorf("Anvil's DHCP and TFTP servers counted less than the firmware did: %s", m[0])
	}
}

// toRepoRoot changes to the repository root: the lab reads templates/ (and, with --vm,
// hack/ and out/agent) from there.
func toRepoRoot(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("templates"); err == nil {
		return
	}
	if err := os.Chdir("../.."); err != nil {
		t.Fatal(err)
	}
}

// TestLabVM runs `anvil demo --vm`: the first server is a qemu VM that PXE-boots the real
// agent (make agent-image's kernel and initramfs, built if missing), registers, reports its
// in-band inventory, installs the lab's v1 image (Debian's kernel and test/qemuos) and boots
// it through GRUB; the lab plays its kubelet. It asserts that the VM became the control plane
// machine's host, Provisioned, with its Node Ready. It needs root, qemu and mkfs.ext4 and takes
// several minutes under TCG, so it runs only with ANVIL_LAB_VM=1:
//
//	ANVIL_LAB_VM=1 KUBEBUILDER_ASSETS=$PWD/bin/envtest/v1.36.3 go test ./cmd/anvil -run TestLabVM -timeout 30m
func TestLabVM(t *testing.T) {
	if os.Getenv("ANVIL_LAB_VM") == "" {
		t.Skip("set ANVIL_LAB_VM=1 to run the lab with a qemu VM (root, qemu; several minutes)")
	}
	if err := netns.Check(); err != nil {
		t.Skip(err)
	}
	toRepoRoot(t)
	quietLogs()
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	var out bytes.Buffer
	opts := defaultLabOptions()
	opts.Out, opts.VM, opts.VMs = &out, true, 1
	err := runLab(ctx, opts)
	text := out.String()
	if err != nil {
		t.Fatalf("lab failed: %v\n%s", err, text)
	}
	defer func() {
		if t.Failed() {
			t.Log(text)
		}
	}()
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`lab-server-1 \(qemu VM\) powered on: network boot once`),
		regexp.MustCompile(`lab-server-1: OS up from slot A; config drive: provider-id anvil://anvil-demo/lab-server-1, user-data runs kubeadm init .*\[qemu VM`),
		regexp.MustCompile(`lab-server-1 \(qemu VM\) is Provisioned for machine demo-control-plane-\S+, runs slot A, node lab-server-1 Ready; in-band inventory: [1-9]\d* CPU cores, \S+ memory, 1 disks`),
	} {
		if !want.MatchString(text) {
			t.Errorf("lab output lacks %s", want)
		}
	}
}
