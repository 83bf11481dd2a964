package wake

import "testing"

// TestUp: a signal is delivered to a waiting channel, and a second one while the first
// is pending does not block.
func TestUp(t *testing.T) {
	c := make(chan struct{}, 1)
	Up(c)
	Up(c) // pending already: must not block
	select {
	case <-c:
	default:
		t.Fatal("no signal after Up")
	}
	select {
	case <-c:
		t.Fatal("two signals from two Ups on a channel of capacity one")
	default:
	}
}
