package bmc

import (
	"errors"
	"strings"
	"testing"
)

func TestParseAddress(t *testing.T) {
	good := []struct {
		in   string
		want Address
	}{
		{"redfish://10.0.0.5", Address{Protocol: Redfish, Host: "10.0.0.5", Port: 443, HTTPS: true}},
		{"redfish+https://bmc.example.com:8443/redfish/v1/Systems/System.Embedded.1/",
			Address{Protocol: Redfish, Host: "bmc.example.com", Port: 8443, HTTPS: true, SystemPath: "/redfish/v1/Systems/System.Embedded.1"}},
		{"redfish+http://127.0.0.1:8000/redfish/v1/Systems/1",
			Address{Protocol: Redfish, Host: "127.0.0.1", Port: 8000, SystemPath: "/redfish/v1/Systems/1"}},
		{"redfish+https://[fd00::5]/redfish/v1/Systems/1",
			Address{Protocol: Redfish, Host: "fd00::5", Port: 443, HTTPS: true, SystemPath: "/redfish/v1/Systems/1"}},
		{"ipmi://10.0.0.5", Address{Protocol: IPMI, Host: "10.0.0.5", Port: 623}},
		{"ipmi://10.0.0.5:6230", Address{Protocol: IPMI, Host: "10.0.0.5", Port: 6230}},
	}
	for _, tc := range good {
		got, err := ParseAddress(tc.in)
		if err != nil {
			t.Errorf("%s: %v", tc.in, err)
			continue
		}
		if got != tc.want {
			t.Errorf("%s: got %+v, want %+v", tc.in, got, tc.want)
		}
	}

	bad := []struct{ in, why string }{
		{"", "empty"},
		{" ipmi://10.0.0.5", "spaces"},
		{"http://10.0.0.5", "scheme"},
		{"idrac://10.0.0.5", "scheme"},
		{"ipmi://", "no host"},
		{"ipmi://10.0.0.5:0", "port"},
		{"ipmi://10.0.0.5:99999", "port"},
		{"ipmi://10.0.0.5:", "empty port"},
		{"ipmi://10.0.0.5/x", "no path"},
		{"redfish://10.0.0.5/api/system", "ComputerSystem"},
		{"redfish://10.0.0.5/redfish/v1/Systems/../Managers/1", ".."},
		{"redfish://10.0.0.5/redfish/v1/Systems/1?x=y", "query"},
		{"redfish:10.0.0.5", "scheme://host"},
	}
	for _, tc := range bad {
		_, err := ParseAddress(tc.in)
		if err == nil {
			t.Errorf("%q accepted", tc.in)
			continue
		}
		if !errors.Is(err, ErrInvalidAddress) || !strings.Contains(err.Error(), tc.why) {
			t.Errorf("%q: error %q should mention %q", tc.in, err, tc.why)
		}
	}
}

func TestParseAddressNeverEchoesCredentials(t *testing.T) {
	for _, in := range []string{"ipmi://admin:s3cr3t@10.0.0.5", "redfish://root:s3cr3t@bmc/redfish/v1/Systems/1", "redfish://root:s3cr3t@bmc:%zz"} {
		_, err := ParseAddress(in)
		if err == nil {
			t.Fatalf("%s accepted", in)
		}
		if strings.Contains(err.Error(), "s3cr3t") {
			t.Errorf("error leaks the password: %v", err)
		}
	}
}

// FuzzParseAddress checks that any accepted address round-trips through its canonical form
// and that no error ever repeats a password given in the URL.
func FuzzParseAddress(f *testing.F) {
	for _, s := range []string{"redfish://10.0.0.5", "redfish+https://h:8443/redfish/v1/Systems/1",
		"redfish+http://[::1]:8000/redfish/v1/Systems/a%20b", "ipmi://10.0.0.5:623", "ipmi://u:p@h", "redfish:opaque"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		a, err := ParseAddress(in)
		if err != nil {
			if strings.Contains(in, "@") && strings.Contains(in, ":SECRET") && strings.Contains(err.Error(), "SECRET") {
				t.Fatalf("error leaks userinfo: %v", err)
			}
			return
		}
		if a.Host == "" || a.Port < 1 || a.Port > 65535 {
			t.Fatalf("accepted %q with host %q port %d", in, a.Host, a.Port)
		}
		again, err := ParseAddress(a.String())
		if err != nil {
			t.Fatalf("canonical form %q of %q does not parse: %v", a.String(), in, err)
		}
		if again != a {
			t.Fatalf("round trip of %q: %+v != %+v", in, again, a)
		}
	})
}
