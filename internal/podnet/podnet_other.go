//go:build !linux

package podnet

import (
	"errors"
	"os"
)

// errNotLinux is what Run and Setup return: network namespaces are Linux's.
var errNotLinux = errors.New("the pod network needs Linux network namespaces")

// Run fails: the pod network needs Linux.
func Run(env []string, forward ...os.Signal) error { return errNotLinux }

// Setup fails: the pod network needs Linux.
func Setup() error { return errNotLinux }
