package ipc_test

import (
	"errors"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/podipc/podipc/pkg/ipc"
)

// emfileListener fails its first accepts with EMFILE, as a process out of file
// descriptors would.
type emfileListener struct {
	net.Listener
	failures atomic.Int32
}

func (l *emfileListener) Accept() (net.Conn, error) {
	if l.failures.Add(-1) >= 0 {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: syscall.EMFILE}
	}
	return l.Listener.Accept()
}

// TestAcceptLoopRetriesErrors: errors that do not end the listener are reported, one
// each, and accepting goes on; closing the listener ends the loop.
func TestAcceptLoopRetriesErrors(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := &emfileListener{Listener: inner}
	ln.failures.Store(3)
	var reported atomic.Int32
	got := make(chan net.Conn, 1)
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		ipc.AcceptLoop(ln, make(chan struct{}), func(err error) {
			if !errors.Is(err, syscall.EMFILE) {
				t.Errorf("reported %v, want EMFILE", err)
			}
			reported.Add(1)
		}, func(c net.Conn) bool { got <- c; return true })
	}()
	c, err := net.Dial("tcp", inner.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Close() }()
	select {
	case s := <-got:
		_ = s.Close()
	case <-time.After(10 * time.Second):
		t.Fatal("no connection accepted after three accept errors")
	}
	if n := reported.Load(); n != 3 {
		t.Errorf("%d errors reported, want 3", n)
	}
	_ = ln.Close()
	select {
	case <-ended:
	case <-time.After(10 * time.Second):
		t.Fatal("the loop did not end when its listener closed")
	}
}
