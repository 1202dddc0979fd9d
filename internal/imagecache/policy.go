package imagecache

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strings"
	"syscall"
)

// ErrRefused is wrapped by every error about a source the cache will not fetch from.
var ErrRefused = errors.New("image source refused")

const maxURLLen = 2048

// ValidateURL checks an image URL before anything is fetched: http or https, a host, no
// credentials. When the host is an IP literal it is checked here too (see allowedAddr);
// host names are checked at dial time, on the address actually connected to, so that a DNS
// answer that changes between check and use (rebinding) cannot get past.
func ValidateURL(raw string, allowLocal bool) (*url.URL, error) {
	if len(raw) > maxURLLen {
		return nil, fmt.Errorf("%w: URL longer than %d bytes", ErrRefused, maxURLLen)
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("%w: not a URL", ErrRefused)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		// file://, ftp://, gopher:// and friends would let a manifest read the provisioner's
		// own files or talk to services that are not image servers.
		return nil, fmt.Errorf("%w: scheme %q is not http or https", ErrRefused, u.Scheme)
	}
	if u.Host == "" || u.Hostname() == "" {
		return nil, fmt.Errorf("%w: URL has no host", ErrRefused)
	}
	if u.User != nil {
		return nil, fmt.Errorf("%w: credentials in image URLs are not accepted", ErrRefused)
	}
	if ip, err := netip.ParseAddr(u.Hostname()); err == nil {
		if err := allowedAddr(ip, allowLocal); err != nil {
			return nil, err
		}
	}
	return u, nil
}

// allowedAddr refuses addresses that reach the boot server itself or its link: loopback,
// link-local (including cloud metadata at 169.254.169.254), unspecified, "this network"
// (0.0.0.0/8), multicast and broadcast. Private ranges stay allowed: internal mirrors are
// the normal place for images.
func allowedAddr(ip netip.Addr, allowLocal bool) error {
	if allowLocal {
		return nil
	}
	ip = ip.Unmap()
	switch {
	case ip.IsLoopback(), ip.IsUnspecified():
		return fmt.Errorf("%w: address %s is local (set AllowLocal for development)", ErrRefused, ip)
	case ip.IsLinkLocalUnicast(), ip.IsLinkLocalMulticast(), ip.IsInterfaceLocalMulticast():
		return fmt.Errorf("%w: address %s is link-local", ErrRefused, ip)
	case ip.IsMulticast():
		return fmt.Errorf("%w: address %s is multicast", ErrRefused, ip)
	case ip.Is4() && (ip.As4()[0] == 0 || ip == netip.AddrFrom4([4]byte{255, 255, 255, 255})):
		return fmt.Errorf("%w: address %s is not a host address", ErrRefused, ip)
	}
	return nil
}

// dialControl runs after DNS resolution, right before connect(2): the address checked is the
// address used.
func dialControl(allowLocal bool) func(network, address string, _ syscall.RawConn) error {
	return func(_, address string, _ syscall.RawConn) error {
		host, _, err := net.SplitHostPort(address)
		if err != nil {
			return fmt.Errorf("%w: bad dial address", ErrRefused)
		}
		ip, err := netip.ParseAddr(host)
		if err != nil {
			return fmt.Errorf("%w: dial address is not an IP", ErrRefused)
		}
		return allowedAddr(ip, allowLocal)
	}
}

// redact returns the URL without query, fragment or credentials, for logs and errors: image
// URLs are often pre-signed, and the signature in the query is a credential.
func redact(u *url.URL) string {
	c := url.URL{Scheme: u.Scheme, Host: u.Host, Path: u.Path}
	s := c.String()
	if u.RawQuery != "" {
		s += "?…"
	}
	return s
}

// Checksum algorithms.
const (
	algoSHA256 = "sha256"
	algoSHA512 = "sha512"
)

// parseChecksum splits "<algo>:<hex>" and checks the digest length; hex is lowercased.
func parseChecksum(s string) (algo, digest string, err error) {
	algo, digest, ok := strings.Cut(s, ":")
	if !ok {
		return "", "", errors.New("checksum must be sha256:<hex> or sha512:<hex>")
	}
	digest = strings.ToLower(digest)
	want := 0
	switch algo {
	case algoSHA256:
		want = 64
	case algoSHA512:
		want = 128
	default:
		return "", "", fmt.Errorf("checksum algorithm %q is not sha256 or sha512", algo)
	}
	if len(digest) != want || strings.Trim(digest, "0123456789abcdef") != "" {
		return "", "", fmt.Errorf("%s checksum must be %d hex digits", algo, want)
	}
	return algo, digest, nil
}
