// Command release writes one version of the Anvil clusterctl provider repository:
// infrastructure-components.yaml (config/default through kustomize, with the release image),
// metadata.yaml and the cluster templates, after checking them against the clusterctl
// provider contract. `make release-manifests` runs it.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/anvil-metal/cluster-api-provider-anvil/internal/release"
)

func main() {
	root := flag.String("root", ".", "Repository root.")
	out := flag.String("out", "out/release", "Directory to write the release files into.")
	version := flag.String("version", "v0.1.0", "Release version; metadata.yaml must have its release series.")
	image := flag.String("image", "", "Manager image (NAME:TAG or NAME@DIGEST); default: config/'s image with the version as tag.")
	flag.Parse()
	if *image == "" {
		*image = release.DefaultImage + ":" + *version
	}
	files, err := release.Build(release.Options{Root: *root, OutDir: *out, Version: *version, Image: *image})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for _, f := range files {
		fmt.Println(filepath.Join(*out, f))
	}
}
