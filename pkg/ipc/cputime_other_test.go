//go:build !unix

package ipc_test

import (
	"testing"
	"time"
)

// processCPUTime is not measured here (getrusage is Unix only): CPU per message and per
// event read as zero.
func processCPUTime(*testing.B) time.Duration { return 0 }
