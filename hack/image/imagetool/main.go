// Command imagetool is the small helper behind hack/image/build.sh and hack/image/verify.sh.
//
//	imagetool base   --layout DIR [--name REF] [--arch ARCH] [--ca-bundle FILE] [--ipxe-dir DIR] [--agent-dir DIR]
//	imagetool verify [--uid N] [--binary-name NAME] [--platform OS/ARCH] [--require-boot-assets] [--require-agent] TARBALL
//
// "base" writes a minimal, scratch-like base image into an OCI layout (ko's KOCACHE/img) and
// prints "REF@DIGEST", which build.sh hands to ko as its base image. ko only reads a base from
// a registry, the Docker daemon or that cache, and our machines reach neither a registry nor a
// daemon, so seeding the cache is what makes the build work offline.
//
// "verify" opens an image tarball and checks what CI relies on: exactly one image, a non-root
// user, and an entrypoint that is a static ELF binary present in the image's filesystem.
package main

import (
	"flag"
	"fmt"
	"os"
	"runtime"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	switch os.Args[1] {
	case "base":
		os.Exit(runBase(os.Args[2:]))
	case "verify":
		os.Exit(runVerify(os.Args[2:]))
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: imagetool base|verify [flags] (see -h of each)")
	os.Exit(2)
}

func runBase(args []string) int {
	fs := flag.NewFlagSet("base", flag.ExitOnError)
	layoutDir := fs.String("layout", "", "OCI layout directory to write the base into (ko reads $KOCACHE/img)")
	name := fs.String("name", defaultBaseName, "repository name to print with the digest; never contacted")
	var o baseOptions
	fs.StringVar(&o.Arch, "arch", runtime.GOARCH, "architecture recorded in the image config; ko builds for it")
	fs.StringVar(&o.CABundle, "ca-bundle", "/etc/ssl/certs/ca-certificates.crt", "CA bundle to include if present (\"\" to skip)")
	fs.StringVar(&o.IPXEDir, "ipxe-dir", "/usr/lib/ipxe", "directory with Debian's iPXE binaries to include if present (\"\" to skip)")
	fs.StringVar(&o.AgentDir, "agent-dir", "", "directory with the agent's vmlinuz and initramfs to include if both are present")
	_ = fs.Parse(args)
	if *layoutDir == "" || fs.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "imagetool base: --layout is required and no arguments are accepted")
		return 2
	}

	img, err := buildBase(o, func(format string, a ...any) {
		fmt.Fprintf(os.Stderr, "imagetool base: "+format+"\n", a...)
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "imagetool base: %v\n", err)
		return 1
	}
	ref, err := writeBase(*layoutDir, *name, img)
	if err != nil {
		fmt.Fprintf(os.Stderr, "imagetool base: %v\n", err)
		return 1
	}
	fmt.Println(ref)
	return 0
}

func runVerify(args []string) int {
	fs := flag.NewFlagSet("verify", flag.ExitOnError)
	var o verifyOptions
	fs.IntVar(&o.WantUID, "uid", 65532, "uid the image must run as; -1 accepts any non-root user")
	fs.StringVar(&o.BinaryName, "binary-name", "manager", "expected file name of the entrypoint binary (\"\" to skip)")
	fs.StringVar(&o.Platform, "platform", "linux/amd64", "expected os/arch of the image (\"\" to skip)")
	fs.BoolVar(&o.RequireBootAssets, "require-boot-assets", false, "fail unless the iPXE binaries are in the image")
	fs.BoolVar(&o.RequireAgent, "require-agent", false, "fail unless the agent kernel and initramfs are in the image")
	_ = fs.Parse(args)
	if fs.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: imagetool verify [flags] TARBALL")
		return 2
	}

	rep, problems := verifyTarball(fs.Arg(0), o)
	fmt.Print(rep)
	if len(problems) > 0 {
		for _, p := range problems {
			fmt.Fprintf(os.Stderr, "verify-image: FAIL: %s\n", p)
		}
		return 1
	}
	fmt.Println("verify-image: OK")
	return 0
}
