package disk

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/disk/fat"
)

// ConfigDrive is the content of the CONFIG partition: a cloud-init NoCloud data source
// (a vfat filesystem labelled "cidata").
type ConfigDrive struct {
	// UserData is the machine's bootstrap data (CABPK's cloud-config), written as user-data.
	UserData []byte
	// MetaData becomes meta-data.
	MetaData MetaData
	// NetworkConfig, when set, becomes network-config (cloud-init network config v1 or v2).
	NetworkConfig []byte
	// HealthGate, when set, puts the A/B health gate on the drive (anvil/).
	HealthGate *HealthGate
}

// MetaData is NoCloud's meta-data. Keys are written with dashes; cloud-init's Jinja
// templates see them with underscores (ds.meta_data.provider_id).
type MetaData struct {
	InstanceID    string
	LocalHostname string
	// ProviderID is the Kubernetes provider ID the kubelet registers with.
	ProviderID string
	// Extra holds further string keys.
	Extra map[string]string
}

// HealthGate configures the OS-side gate that marks a slot good.
type HealthGate struct {
	// HealthzURL is polled until it answers "ok" (default: the kubelet's
	// http://127.0.0.1:10248/healthz).
	HealthzURL string
	// Timeout for the slot to become healthy (default 15 minutes).
	Timeout time.Duration
	// NoReboot keeps an unhealthy slot running instead of rebooting to spend an attempt.
	NoReboot bool
	// ReportURL and ReportToken, when set, make the gate report every boot to Anvil (the
	// agent API's boot-report call): the slot it runs, whether it is marked good, and the
	// slot GRUB gave up on. That is how Anvil learns that an upgrade committed or rolled back.
	ReportURL, ReportToken string
	// NoUserDataHook leaves user-data exactly as given. By default cloud-config user-data
	// is wrapped into a MIME multipart message with a second, shell-script part that
	// installs the gate from the drive; with NoUserDataHook the image must run
	// anvil/install.sh itself.
	NoUserDataHook bool
}

// Config drive file names.
const (
	ConfigDriveLabel      = "cidata"
	configUserData        = "user-data"
	configMetaData        = "meta-data"
	configNetworkConfig   = "network-config"
	configGateDir         = "anvil"
	defaultHealthzURL     = "http://127.0.0.1:10248/healthz"
	defaultHealthzTimeout = 15 * time.Minute
)

// Render returns the files of the drive. espPartUUID and configPartUUID locate the ESP
// (for the gate) and the drive itself (for the user-data hook).
func (c *ConfigDrive) Render(espPartUUID, configPartUUID GUID) ([]fat.File, error) {
	if c.MetaData.InstanceID == "" {
		return nil, fmt.Errorf("config drive: meta-data needs an instance-id")
	}
	md, err := c.MetaData.render()
	if err != nil {
		return nil, err
	}
	userData := c.UserData
	files := []fat.File{{Path: configMetaData, Data: md}}
	if len(c.NetworkConfig) > 0 {
		files = append(files, fat.File{Path: configNetworkConfig, Data: c.NetworkConfig})
	}
	if g := c.HealthGate; g != nil {
		url := g.HealthzURL
		if url == "" {
			url = defaultHealthzURL
		}
		if strings.ContainsAny(url, "\"'`$\\\n ") {
			return nil, fmt.Errorf("config drive: health URL %q contains characters that are not allowed", url)
		}
		timeout := g.Timeout
		if timeout <= 0 {
			timeout = defaultHealthzTimeout
		}
		reboot := 1
		if g.NoReboot {
			reboot = 0
		}
		env := fmt.Sprintf("ANVIL_ESP_PARTUUID=%s\nANVIL_HEALTHZ_URL=%s\nANVIL_TIMEOUT_SECONDS=%d\nANVIL_REBOOT_ON_FAILURE=%d\n",
			strings.ToLower(espPartUUID.String()), url, int(timeout.Seconds()), reboot)
		if g.ReportURL != "" || g.ReportToken != "" {
			if err := validReport(g.ReportURL, g.ReportToken); err != nil {
				return nil, err
			}
			env += fmt.Sprintf("ANVIL_REPORT_URL=%s\nANVIL_REPORT_TOKEN=%s\n", g.ReportURL, g.ReportToken)
		}
		files = append(files,
			fat.File{Path: configGateDir + "/anvil-mark-good", Data: []byte(HealthGateScript)},
			fat.File{Path: configGateDir + "/anvil-mark-good.service", Data: []byte(HealthGateUnit)},
			fat.File{Path: configGateDir + "/anvil.env", Data: []byte(env)},
			fat.File{Path: configGateDir + "/install.sh", Data: []byte(HealthGateInstallScript)},
		)
		if !g.NoUserDataHook && isCloudConfig(userData) {
			hook := fmt.Sprintf(userDataHookTemplate, strings.ToLower(configPartUUID.String()))
			userData = wrapMultipart(userData, []byte(hook))
		}
	}
	files = append(files, fat.File{Path: configUserData, Data: userData})
	return files, nil
}

// validReport checks what goes into anvil.env, which the gate sources as shell: an http(s)
// URL and a token of URL-safe characters, nothing a shell would interpret.
func validReport(url, token string) error {
	if !strings.HasPrefix(url, "http://") && !strings.HasPrefix(url, "https://") || strings.ContainsAny(url, "\"'`$\\\n ;&|<>(){}") {
		return fmt.Errorf("config drive: report URL %q must be http(s) without shell characters", url)
	}
	if token == "" || strings.IndexFunc(token, func(r rune) bool {
		urlSafe := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-'
		return !urlSafe
	}) >= 0 {
		return fmt.Errorf("config drive: the report token must be non-empty and URL-safe base64")
	}
	return nil
}

// isCloudConfig reports user-data cloud-init can take as one part of a multipart message
// (cloud-config, optionally as a Jinja template, or a script). Ignition JSON cannot.
func isCloudConfig(b []byte) bool {
	for _, p := range []string{"#cloud-config", "## template: jinja", "#!"} {
		if bytes.HasPrefix(b, []byte(p)) {
			return true
		}
	}
	return false
}

// wrapMultipart wraps the bootstrap data and the hook into a MIME multipart message. Both parts
// are text/x-not-multipart, so cloud-init picks each handler from the part's first line
// (#cloud-config, ## template: jinja, #!), and base64 so any bytes pass unchanged.
func wrapMultipart(userData, hook []byte) []byte {
	var rnd [12]byte
	_, _ = rand.Read(rnd[:])
	boundary := "==anvil-" + hex.EncodeToString(rnd[:]) + "=="
	var b bytes.Buffer
	fmt.Fprintf(&b, "Content-Type: multipart/mixed; boundary=\"%s\"\nMIME-Version: 1.0\n\n", boundary)
	part := func(name string, data []byte) {
		fmt.Fprintf(&b, "--%s\nContent-Type: text/x-not-multipart; charset=\"utf-8\"\nMIME-Version: 1.0\n"+
			"Content-Transfer-Encoding: base64\nContent-Disposition: attachment; filename=\"%s\"\n\n", boundary, name)
		enc := base64.StdEncoding.EncodeToString(data)
		for len(enc) > 76 {
			b.WriteString(enc[:76] + "\n")
			enc = enc[76:]
		}
		b.WriteString(enc + "\n")
	}
	part("bootstrap", userData)
	part("anvil-health-gate.sh", hook)
	fmt.Fprintf(&b, "--%s--\n", boundary)
	return b.Bytes()
}

func (m MetaData) render() ([]byte, error) {
	var b bytes.Buffer
	line := func(k, v string) error {
		q, err := json.Marshal(v) // a JSON string is a valid YAML double-quoted scalar
		if err != nil {
			return err
		}
		fmt.Fprintf(&b, "%s: %s\n", k, q)
		return nil
	}
	kv := [][2]string{{"instance-id", m.InstanceID}, {"local-hostname", m.LocalHostname}, {"provider-id", m.ProviderID}}
	for _, p := range kv {
		if p[1] != "" {
			if err := line(p[0], p[1]); err != nil {
				return nil, err
			}
		}
	}
	keys := make([]string, 0, len(m.Extra))
	for k := range m.Extra {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if k == "" || strings.ContainsAny(k, ": \n\"'#") {
			return nil, fmt.Errorf("config drive: invalid meta-data key %q", k)
		}
		if err := line(k, m.Extra[k]); err != nil {
			return nil, err
		}
	}
	return b.Bytes(), nil
}
