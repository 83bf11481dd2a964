//go:build unix

package ipc_test

import (
	"syscall"
	"testing"
	"time"
)

// processCPUTime is the user plus system CPU time this process has used so far, all threads.
func processCPUTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
