// Command manager is a throwaway stand-in for ./cmd/manager, so hack/image/build.sh and
// verify.sh can be exercised before (or independently of) the real manager:
//
//	hack/image/build.sh ./hack/image/testdata/manager out/selftest-image.tar
//	hack/image/verify.sh out/selftest-image.tar
//
// It imports net and os/user on purpose: with CGO_ENABLED=1 those two pull in libc, so the
// binary would come out dynamically linked and verify.sh would catch it.
package main

import (
	"fmt"
	"net"
	"os"
	"os/user"
)

func main() {
	u, err := user.Current()
	name := "?"
	if err == nil {
		name = u.Username
	}
	addrs, _ := net.LookupHost("localhost")
	fmt.Printf("anvil manager stand-in: uid=%d user=%s localhost=%v\n", os.Getuid(), name, addrs)
}
