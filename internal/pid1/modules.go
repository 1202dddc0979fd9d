package pid1

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// ModuleLoadReport says what LoadModules did.
type ModuleLoadReport struct {
	Loaded int
	// Failed maps a module path to its last error.
	Failed map[string]error
}

// ReadLoadOrder reads a module list (one path a line; '#' starts a comment).
func ReadLoadOrder(path string) ([]string, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []string
	sc := bufio.NewScanner(bytes.NewReader(raw))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line != "" && !strings.HasPrefix(line, "#") {
			out = append(out, line)
		}
	}
	return out, sc.Err()
}

// LoadModules loads modules in the given order with load, which reports an already loaded
// module as success. A module that fails is tried again after a pass in which another one
// loaded (its dependency may have been late), until a pass makes no progress. Failures are
// reported, not fatal: a driver for hardware the server lacks may refuse to load, and the
// agent can work without it.
func LoadModules(paths []string, load func(path string) error) ModuleLoadReport {
	rep := ModuleLoadReport{Failed: map[string]error{}}
	pending := paths
	for len(pending) > 0 {
		var again []string
		for _, p := range pending {
			if err := load(p); err != nil {
				rep.Failed[p] = err
				again = append(again, p)
				continue
			}
			delete(rep.Failed, p)
			rep.Loaded++
		}
		if len(again) == len(pending) {
			break
		}
		pending = again
	}
	return rep
}

// FinitModule loads a kernel module file with finit_module(2). A module that is already
// loaded counts as loaded.
func FinitModule(path string) error {
	f, err := os.Open(path) //nolint:gosec // paths come from the initramfs's own load order
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	err = unix.FinitModule(int(f.Fd()), "", 0) //nolint:gosec // a file descriptor fits in int
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("finit_module %s: %w", path, err)
	}
	return nil
}
