// Package bmc reaches servers' baseboard management controllers over Redfish and IPMI.
package bmc

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
)

// Protocol is the management protocol a BMC speaks.
type Protocol string

const (
	Redfish Protocol = "redfish"
	IPMI    Protocol = "ipmi"
)

// DefaultIPMIPort is the RMCP+ port of IPMI v2.0 LAN.
const DefaultIPMIPort = 623

// Address is a parsed AnvilHost spec.bmc.address.
type Address struct {
	Protocol Protocol
	// Host is a DNS name or an IP address (IPv6 without brackets).
	Host string
	// Port is explicit or the protocol's default (443 for HTTPS, 80 for HTTP, 623 for IPMI).
	Port int
	// HTTPS is true for redfish:// and redfish+https://.
	HTTPS bool
	// SystemPath is the Redfish ComputerSystem's path, e.g. /redfish/v1/Systems/1; empty
	// means "the only system the service has".
	SystemPath string
}

// HostPort is the address to dial.
func (a Address) HostPort() string { return net.JoinHostPort(a.Host, strconv.Itoa(a.Port)) }

// BaseURL is the Redfish service's scheme://host:port.
func (a Address) BaseURL() string {
	scheme := "http"
	if a.HTTPS {
		scheme = "https"
	}
	return scheme + "://" + a.HostPort()
}

// String renders the address back in canonical form.
func (a Address) String() string {
	switch a.Protocol {
	case IPMI:
		return "ipmi://" + a.HostPort()
	default:
		scheme := "redfish+http"
		if a.HTTPS {
			scheme = "redfish+https"
		}
		return scheme + "://" + a.HostPort() + a.SystemPath
	}
}

// ErrInvalidAddress wraps every ParseAddress failure.
var ErrInvalidAddress = errors.New("invalid BMC address")

// ParseAddress parses a BMC URL: redfish://, redfish+https://, redfish+http:// (each with an
// optional port and ComputerSystem path) or ipmi:// (optional port, no path). Errors say what
// is wrong and never echo userinfo, which may hold a password.
func ParseAddress(raw string) (Address, error) {
	fail := func(format string, args ...any) (Address, error) {
		return Address{}, fmt.Errorf("%w: %s", ErrInvalidAddress, fmt.Sprintf(format, args...))
	}
	if strings.TrimSpace(raw) != raw || raw == "" {
		return fail("empty or surrounded by spaces")
	}
	u, err := url.Parse(raw)
	if err != nil {
		// url.Error repeats the input, which may carry credentials: say only what kind of error.
		return fail("not a URL")
	}
	if u.User != nil {
		return fail("credentials must not be in the URL; put them in the credentials Secret")
	}
	var a Address
	switch u.Scheme {
	case "redfish", "redfish+https":
		a = Address{Protocol: Redfish, HTTPS: true, Port: 443}
	case "redfish+http":
		a = Address{Protocol: Redfish, Port: 80}
	case "ipmi":
		a = Address{Protocol: IPMI, Port: DefaultIPMIPort}
	default:
		return fail("scheme %q is not one of redfish, redfish+https, redfish+http, ipmi", u.Scheme)
	}
	if u.Opaque != "" {
		return fail("expected scheme://host")
	}
	a.Host = u.Hostname()
	if a.Host == "" {
		return fail("no host")
	}
	if !validHost(a.Host) {
		return fail("host %q is not a DNS name or IP address", a.Host)
	}
	if p := u.Port(); p != "" {
		port, err := strconv.Atoi(p)
		if err != nil || port < 1 || port > 65535 {
			return fail("port %q is not between 1 and 65535", p)
		}
		a.Port = port
	} else if strings.HasSuffix(u.Host, ":") {
		return fail("empty port")
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return fail("query strings and fragments are not allowed")
	}
	path := strings.TrimRight(u.EscapedPath(), "/")
	switch {
	case a.Protocol == IPMI && path != "":
		return fail("ipmi:// addresses take no path")
	case a.Protocol == Redfish && path != "" && !strings.HasPrefix(path, "/redfish/v1/Systems/"):
		return fail("path %q is not a ComputerSystem under /redfish/v1/Systems/", path)
	case strings.Contains(path, "/../") || strings.HasSuffix(path, "/.."):
		return fail("path must not contain ..")
	}
	a.SystemPath = path
	return a, nil
}

// validHost accepts an IP address or a DNS name of letters, digits, '-', '_' and '.'.
func validHost(h string) bool {
	if net.ParseIP(h) != nil {
		return true
	}
	if len(h) > 253 {
		return false
	}
	for _, label := range strings.Split(h, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for _, r := range label {
			letterOrDigit := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9'
			if !letterOrDigit && r != '-' && r != '_' {
				return false
			}
		}
	}
	return true
}
