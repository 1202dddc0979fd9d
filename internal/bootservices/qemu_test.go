package bootservices

import (
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/dhcp"
	"github.com/anvil-metal/cluster-api-provider-anvil/internal/boot/httpboot"
)

// TestIPXEInQEMU boots real firmware — iPXE from Debian's ipxe-qemu NIC ROM under SeaBIOS,
// and OVMF's own UEFI PXE client — under qemu with TCG, against the boot services as the
// manager assembles them (reservation DHCP, TFTP, HTTP, the provisioning backend and its
// tokens) on a lab network (qemuLab) that the test makes and deletes.
//
// Four machines share the network:
//   - "direct" (SeaBIOS, iPXE ROM) gets its reserved address and the per-host script URL
//     from DHCP (the {mac} template, expanded by the DHCP server), fetches the script, the
//     kernel and the initramfs;
//   - "entry" (the same) is told the entry script (/ipxe/boot.ipxe), which makes iPXE expand
//     ${mac:hexhyp} itself and chain to its per-host script: the URL form for sites whose
//     own DHCP server points machines at Anvil;
//   - "uefi" (OVMF, a NIC without option ROM) is a UEFI PXE client (architecture 7): it must
//     be given ipxe.efi, fetch it over TFTP, and the iPXE it starts must then go on as above;
//   - "stranger" is a MAC Anvil is not booting: it must get no DHCP answer at all.
//
// The agent kernel is a stand-in (testdata/standin-kernel.S): a Multiboot kernel, padded to
// 1 MiB, that prints on the serial console the size and byte sum of itself and of the
// initramfs iPXE loaded, and the command line iPXE gave it; iPXE for UEFI, which boots no
// Multiboot, runs the iPXE script in its first bytes instead. The test checks the boot
// services' own records (the DHCP answers seen on the wire, the TFTP transfer, the scripts
// and the artifact bytes served), the booted kernel's view of the same bytes, and that the
// token on its command line is valid for the host and the boot attempt.
//
// The UEFI machine sets the pace: about 25 s on a 2-core machine with a load average of 10
// (12 s for OVMF to start under TCG, 3-4 s of EDK2 collecting DHCP offers, 1 s of TFTP, 7 s
// for iPXE to start); the BIOS machines are done after about 8 s. The lab also carries router
// advertisements (see startDHCPCapture), without which iPXE waits about 20 s for IPv6
// before using its DHCPv4 lease.
func TestIPXEInQEMU(t *testing.T) {
	lab := newQEMULab(t, dhcp.ModeReservation)
	direct := &qemuMachine{name: "direct", mac: "52:54:00:a0:00:01", ip: "192.0.2.51"}
	entry := &qemuMachine{name: "entry", mac: "52:54:00:a0:00:02", ip: "192.0.2.52", scriptPath: "/ipxe/mac/52-54-00-a0-00-02"}
	uefi := &qemuMachine{name: "uefi", mac: "52:54:00:a0:00:03", ip: "192.0.2.53", uefi: true}
	stranger := &qemuMachine{name: "stranger", mac: "52:54:00:a0:00:99"}
	known := []*qemuMachine{direct, entry, uefi}
	for _, m := range known {
		lab.provision(m)
	}
	// The entry machine's DHCP answer names the static entry script instead of its own.
	h, ok := lab.svc.Booting.Lookup(mustMAC(t, entry.mac))
	if !ok {
		t.Fatal("the DHCP server was not told about the entry machine")
	}
	h.ScriptURL = lab.svc.PublicURL() + "/ipxe/boot.ipxe"
	must(t, lab.svc.Booting.Set(mustMAC(t, entry.mac), h))
	for _, m := range append(known, stranger) {
		lab.boot(m)
	}
	defer lab.dumpOnFailure(direct, entry, uefi, stranger)

	// A guard only: the test takes about 25 s, but TCG slows down with the machine's load
	// (70 s with the load average at 23).
	deadline := time.Now().Add(3 * time.Minute)
	// The stranger is heard twice (iPXE retransmits), then stopped: it has had all the time
	// an answer takes, and its CPU is better spent on the others.
	lab.waitHeard(deadline, stranger, 2)
	lab.waitBooted(deadline, known...)
	elapsed := time.Since(lab.start)

	server := labServerIP.String()
	for _, m := range known {
		// An offer and an ack of the reserved address; iPXE is given its script URL (and UEFI
		// firmware, before it, ipxe.efi).
		files := []string{lab.svc.PublicURL() + m.scriptPath}
		if m == entry {
			files = []string{lab.svc.PublicURL() + "/ipxe/boot.ipxe"}
		}
		if m.uefi {
			files = append([]string{"ipxe.efi"}, files...)
		}
		for _, f := range files {
			for _, typ := range []string{"OFFER", "ACK"} {
				if !hasReply(lab.capture.replies(m.mac, server), dhcpReply{Type: typ, YourIP: m.ip, File: f, Server: server}) {
					t.Errorf("%s: no %s of %s with boot file %s among %+v", m.name, typ, m.ip, f, lab.capture.replies(m.mac, ""))
				}
			}
		}
		lab.checkBoot(m)
	}
	// The entry machine's first request was the entry script itself.
	for _, r := range lab.records() {
		if strings.HasPrefix(r.Remote, entry.ip+":") {
			if r.Kind != httpboot.ServedEntry {
				t.Errorf("entry machine's first request was %s, want /ipxe/boot.ipxe", r.Path)
			}
			break
		}
	}
	// The stranger: heard, never answered, never served.
	if got := lab.capture.replies(stranger.mac, ""); len(got) > 0 {
		t.Errorf("unknown MAC got DHCP replies %+v", got)
	}
	for _, r := range lab.records() {
		if r.Kind == httpboot.ServedScript && r.MAC.String() == stranger.mac {
			t.Errorf("unknown MAC was served a script: %+v", r)
		}
	}
	if st := lab.svc.DHCPStats(); st.Unknown < 2 {
		t.Errorf("DHCP stats %+v: the unknown machine's requests were not counted", st)
	}
	// One TFTP transfer: ipxe.efi to the UEFI firmware (which may ask for its size first).
	// iPXE ROMs go straight to HTTP.
	if st := lab.svc.TFTPStats(); st.Served != 1 || st.Refused != 0 || st.Failed != 0 || st.SizeQueries > 1 {
		t.Errorf("TFTP %+v, want exactly one file served (ipxe.efi for %s)", st, uefi.name)
	}
	t.Logf("4 VMs, 3 booted through iPXE in %.1fs; DHCP %+v; TFTP %+v", elapsed.Seconds(), lab.svc.DHCPStats(), lab.svc.TFTPStats())
}

// TestIPXEInQEMUProxy boots the same firmware beside a site DHCP server (dnsmasq, which
// gives addresses and knows nothing of network boot), with Anvil in proxy mode: the
// machines take their address from dnsmasq and their boot file from Anvil's ProxyDHCP
// answers, and Anvil never hands out an address. A machine Anvil is not booting gets its
// address from dnsmasq and nothing from Anvil. About 20 s on a busy 2-core machine.
func TestIPXEInQEMUProxy(t *testing.T) {
	lab := newQEMULab(t, dhcp.ModeProxy)
	leases := lab.siteDHCP()
	bios := &qemuMachine{name: "bios", mac: "52:54:00:b0:00:01"}
	uefi := &qemuMachine{name: "uefi", mac: "52:54:00:b0:00:02", uefi: true}
	stranger := &qemuMachine{name: "stranger", mac: "52:54:00:b0:00:99"}
	known := []*qemuMachine{bios, uefi}
	for _, m := range known {
		lab.provision(m)
	}
	for _, m := range append(known, stranger) {
		lab.boot(m)
	}
	defer lab.dumpOnFailure(bios, uefi, stranger)

	deadline := time.Now().Add(3 * time.Minute) // a guard, as in TestIPXEInQEMU
	// The stranger has its lease from the site server (dnsmasq writes it when it sends the
	// ACK): every DHCP server has had its say.
	for !leased(leases, stranger.mac) {
		if time.Now().After(deadline) {
			t.Fatal("the site server gave the unknown machine no lease")
		}
		time.Sleep(200 * time.Millisecond)
	}
	lab.waitHeard(deadline, stranger, 2)
	lab.waitBooted(deadline, known...)
	elapsed := time.Since(lab.start)

	server := labServerIP.String()
	for _, m := range known {
		if !leased(leases, m.mac) {
			t.Errorf("the site server has no lease for %s", m.name)
		}
		ip, err := netip.ParseAddr(lab.checkBoot(m))
		if err != nil || ip.Less(netip.MustParseAddr("192.0.2.100")) || netip.MustParseAddr("192.0.2.150").Less(ip) {
			t.Errorf("%s booted from %v, want an address from the site's range", m.name, ip)
		}
		// Anvil's answers: boot files only, no address. iPXE is given its script URL (and
		// UEFI firmware, before it, ipxe.efi).
		answers := lab.capture.replies(m.mac, server)
		for _, r := range answers {
			if r.YourIP != "0.0.0.0" {
				t.Errorf("%s: Anvil handed out an address in proxy mode: %+v", m.name, r)
			}
		}
		files := []string{lab.svc.PublicURL() + m.scriptPath}
		if m.uefi {
			files = append([]string{"ipxe.efi"}, files...)
		}
		for _, f := range files {
			if !hasReply(answers, dhcpReply{Type: "OFFER", YourIP: "0.0.0.0", File: f, Server: server}) {
				t.Errorf("%s: no ProxyDHCP offer with boot file %s among %+v", m.name, f, answers)
			}
		}
	}
	// The stranger: an address from the site server, nothing from Anvil.
	if got := lab.capture.replies(stranger.mac, server); len(got) > 0 {
		t.Errorf("Anvil answered the unknown MAC: %+v", got)
	}
	if st := lab.svc.TFTPStats(); st.Served != 1 || st.Failed != 0 {
		t.Errorf("TFTP %+v, want exactly one file served (ipxe.efi for %s)", st, uefi.name)
	}
	t.Logf("3 VMs beside dnsmasq, 2 booted through iPXE in %.1fs; DHCP %+v; TFTP %+v", elapsed.Seconds(), lab.svc.DHCPStats(), lab.svc.TFTPStats())
}

// leased reports whether dnsmasq's lease file has a lease for mac.
func leased(leaseFile, mac string) bool {
	raw, _ := os.ReadFile(leaseFile)
	return strings.Contains(string(raw), " "+mac+" ")
}

func hasReply(have []dhcpReply, want dhcpReply) bool {
	for _, r := range have {
		if r == want {
			return true
		}
	}
	return false
}
