//go:build !linux

package testenv

import (
	"fmt"
	"os"
)

// EnterPodNetwork needs Linux network namespaces; elsewhere the package fails.
func EnterPodNetwork() {
	fmt.Fprintln(os.Stderr, "FAIL: the pod network of the sidecar integration tests needs Linux network namespaces")
	os.Exit(1)
}
