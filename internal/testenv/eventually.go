package testenv

import (
	"testing"
	"time"
)

// Eventually calls check every 100 ms until it returns nil, failing t with check's last
// error after a generous 60 s or when the test ends. Tests against a shared API server
// wait this way rather than assert how long anything takes.
func Eventually(t testing.TB, what string, check func() error) {
	t.Helper()
	deadline := time.NewTimer(60 * time.Second)
	defer deadline.Stop()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		err := check()
		if err == nil {
			return
		}
		select {
		case <-deadline.C:
			t.Fatalf("%s: still failing after 60s: %v", what, err)
		case <-t.Context().Done():
			t.Fatalf("%s: test ended: %v", what, err)
		case <-tick.C:
		}
	}
}
