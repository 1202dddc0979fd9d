package main

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/tftp"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/lab"
)

// agentImageDir is where `make agent-image` puts the agent's kernel and initramfs.
const agentImageDir = "out/agent"

// bootArtifacts puts the agent kernel and initramfs the boot services serve into dir/artifacts:
// the real ones from `make agent-image` when they were built, else small generated stand-ins
// (an x86 boot header and a gzipped cpio archive: what the emulated firmware checks). It says
// which it used.
func bootArtifacts(dir string) (string, string, error) {
	out := filepath.Join(dir, "artifacts")
	if err := os.MkdirAll(out, 0o750); err != nil {
		return "", "", err
	}
	kernel, initrd := filepath.Join(agentImageDir, "vmlinuz"), filepath.Join(agentImageDir, "initramfs.cpio.gz")
	if fileExists(kernel) && fileExists(initrd) {
		if err := copyFile(kernel, filepath.Join(out, "vmlinuz")); err != nil {
			return "", "", err
		}
		if err := copyFile(initrd, filepath.Join(out, "initramfs")); err != nil {
			return "", "", err
		}
		return out, "the agent image from " + agentImageDir, nil
	}
	if err := os.WriteFile(filepath.Join(out, "vmlinuz"), standInKernel(2<<20), 0o600); err != nil {
		return "", "", err
	}
	initramfs, err := standInInitramfs(1 << 20)
	if err != nil {
		return "", "", err
	}
	if err := os.WriteFile(filepath.Join(out, "initramfs"), initramfs, 0o600); err != nil {
		return "", "", err
	}
	return out, "generated stand-ins (`make agent-image` builds the real ones into " + agentImageDir + ")", nil
}

// ipxeDir is what the boot services' TFTP serves: Debian's iPXE binaries when installed, else
// stand-ins in dir/tftp (the emulated firmware only loads them, it doesn't run them).
func ipxeDir(dir string) (string, string, error) {
	const debian = "/usr/lib/ipxe"
	if tftp.FindIPXE(debian).Err() == nil {
		return debian, "Debian's iPXE", nil
	}
	out := filepath.Join(dir, "tftp")
	if err := os.MkdirAll(out, 0o750); err != nil {
		return "", "", err
	}
	for i, name := range tftp.IPXENames() {
		if err := os.WriteFile(filepath.Join(out, name), pseudoRandom(uint64(i), 64<<10), 0o600); err != nil {
			return "", "", err
		}
	}
	return out, "stand-in iPXE binaries (apt-get install ipxe for the real ones)", nil
}

// standInKernel is size bytes with an x86 Linux boot header (boot signature, "HdrS").
func standInKernel(size int) []byte {
	k := pseudoRandom(1, size)
	copy(k, "Anvil lab stand-in agent kernel: loaded by the emulated firmware, never run.\n")
	k[0x1FE], k[0x1FF] = 0x55, 0xAA
	copy(k[0x202:], "HdrS")
	binary.LittleEndian.PutUint16(k[0x206:], 0x020f) // boot protocol 2.15
	return k
}

// standInInitramfs is a gzipped newc cpio archive with an /init that says what it is and a
// payload of payloadSize bytes.
func standInInitramfs(payloadSize int) ([]byte, error) {
	var b bytes.Buffer
	z := gzip.NewWriter(&b)
	files := []struct {
		name string
		data []byte
	}{
		{"init", []byte("#!/bin/sh\necho 'Anvil lab stand-in initramfs: build the real one with make agent-image'\n")},
		{"payload", pseudoRandom(2, payloadSize)},
		{"TRAILER!!!", nil},
	}
	for i, f := range files {
		mode := 0o100755
		if f.data == nil {
			mode = 0
		}
		hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
			i+1, mode, 0, 0, 1, 0, len(f.data), 0, 0, 0, 0, len(f.name)+1, 0)
		if _, err := io.WriteString(z, hdr+f.name+"\x00"+pad(len(hdr)+len(f.name)+1)); err != nil {
			return nil, err
		}
		if _, err := z.Write(append(f.data, pad(len(f.data))...)); err != nil {
			return nil, err
		}
	}
	if err := z.Close(); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// pad is the NULs that align n bytes to 4 (newc's alignment).
func pad(n int) string { return string(make([]byte, (4-n%4)%4)) }

// pseudoRandom is n reproducible bytes that don't compress.
func pseudoRandom(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 0x616e76696c)) //nolint:gosec // filler, not a secret
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		var w [8]byte
		binary.LittleEndian.PutUint64(w[:], r.Uint64())
		copy(b[i:], w[:])
	}
	return b
}

func fileExists(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular()
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer func() { _ = in.Close() }()
	out, err := os.Create(to)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		_ = out.Close()
		return err
	}
	return out.Close()
}

// netbootLog is every network boot the lab's firmware did, for the closing account and the
// checks that every PXE power-on went over Anvil's DHCP and TFTP.
type netbootLog struct {
	mu    sync.Mutex
	boots []lab.NetworkBoot
}

func (l *netbootLog) add(nb lab.NetworkBoot) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.boots = append(l.boots, nb)
}

// netbootSummary counts the network boots: how many loaded the agent, went on to the disk
// (the script said so) or failed, and whether every lease came from server.
type netbootSummary struct {
	Boots, Agent, Disk, Failed int
	// FromAnvil counts leases given by the boot services' DHCP server.
	FromAnvil int
	// BootFiles are the TFTP files loaded; Kernel and Initrd the artifact sizes last loaded.
	BootFiles      map[string]int
	Kernel, Initrd int64
	FirstError     error
}

func (l *netbootLog) summary(server string) netbootSummary {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := netbootSummary{BootFiles: map[string]int{}}
	for _, b := range l.boots {
		s.Boots++
		switch {
		case b.Err != nil:
			s.Failed++
			if s.FirstError == nil {
				s.FirstError = fmt.Errorf("%s: %w", b.Server, b.Err)
			}
			continue
		case b.Agent:
			s.Agent++
			s.Kernel, s.Initrd = b.Kernel.Bytes, b.Initrd.Bytes
		default:
			s.Disk++
		}
		if b.DHCPServer.String() == server {
			s.FromAnvil++
		}
		s.BootFiles[b.BootFile]++
	}
	return s
}

// check fails unless there were network boots and each took its lease from Anvil and loaded
// what its script said.
func (s netbootSummary) check() error {
	switch {
	case s.Boots == 0:
		return errors.New("no server network-booted over the provisioning network")
	case s.Failed > 0:
		return fmt.Errorf("%d of %d network boots failed, the first: %w", s.Failed, s.Boots, s.FirstError)
	case s.FromAnvil != s.Boots:
		return fmt.Errorf("only %d of %d network boots took their lease from Anvil's DHCP server", s.FromAnvil, s.Boots)
	}
	return nil
}

// provisioningNet is what the lab's servers network-boot from: the provisioning network (nil
// where network namespaces can't be made), the TFTP directory and the agent artifacts.
type provisioningNet struct {
	network            *lab.Network
	tftpDir, artifacts string
}

// newProvisioningNet prepares the artifacts and makes the network with makeNetwork
// (lab.NewNetwork), saying in one line what the servers will boot over; where it can't be made
// (not root, no iproute2) it says so and the lab goes on without.
func newProvisioningNet(dir string, out io.Writer, makeNetwork func() (*lab.Network, error)) (*provisioningNet, error) {
	pn := &provisioningNet{}
	artifacts, what, err := bootArtifacts(dir)
	if err != nil {
		return nil, err
	}
	pn.artifacts = artifacts
	network, err := makeNetwork()
	if err != nil {
		fmt.Fprintf(out, "    no provisioning network (%v): the emulated firmware asks the boot services' HTTP endpoint for its script, without DHCP or TFTP; agent: %s\n", err, what)
		return pn, nil
	}
	pn.network = network
	tftpDir, ipxe, err := ipxeDir(dir)
	if err != nil {
		_ = network.Close()
		return nil, err
	}
	pn.tftpDir = tftpDir
	fmt.Fprintf(out, "    provisioning network %s (bridge in namespace %s): Anvil's DHCP (reservation mode) and TFTP (%s) at %s; agent: %s\n",
		network.Subnet, network.Switch.Name, ipxe, network.ServerIP, what)
	return pn, nil
}

func (p *provisioningNet) close() {
	if p.network != nil {
		_ = p.network.Close()
	}
}
