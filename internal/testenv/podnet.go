package testenv

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"

	"github.com/podipc/podipc/internal/podnet"
)

// EnterPodNetwork moves the test binary into a private network namespace in which
// PodCIDR is local, and returns there; call it first in TestMain, before Main.
//
// Real sidecars must run on addresses a pod could have, distinct and not loopback (see
// package podnet). The binary re-executes itself there; the control plane (advertising
// podnet.NodeIP), the sidecars and the test all run inside, and nothing can collide with
// other tests' ports. The parent exits with the child's status.
func EnterPodNetwork() {
	if podnet.Inside() {
		if err := podnet.Setup(); err != nil {
			fmt.Fprintf(os.Stderr, "FAIL: setting up the pod network: %v\n", err)
			os.Exit(1)
		}
		return
	}
	// Forward interrupts so the child stops its control plane, and SIGQUIT so it dumps its
	// goroutines; the test timeout is the child's own (it parses the same -test.timeout).
	err := podnet.Run(nil, syscall.SIGINT, syscall.SIGTERM, syscall.SIGQUIT)
	var exit *exec.ExitError
	switch {
	case err == nil:
		os.Exit(0)
	case errors.As(err, &exit) && exit.ExitCode() >= 0:
		os.Exit(exit.ExitCode())
	case errors.As(err, &exit):
		fmt.Fprintf(os.Stderr, "FAIL: the test binary in the pod network: %v\n", err)
	default:
		fmt.Fprintf(os.Stderr, "FAIL: entering the pod network: %v\n", err)
	}
	os.Exit(1)
}
