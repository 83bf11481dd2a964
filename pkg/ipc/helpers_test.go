package ipc_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/podipc/podipc/pkg/ipc"
)

// wait is the generous bound for anything that should happen "soon". Tests never
// assert how fast something happens, only that it does.
const wait = 20 * time.Second

var networks = []string{"tcp", "unix"}

// address returns a fresh address to listen on: an ephemeral loopback port, or a socket
// path short enough for sun_path (t.TempDir paths can exceed its 108 bytes).
func address(t *testing.T, network string) string {
	t.Helper()
	if network == "tcp" {
		return "127.0.0.1:0"
	}
	dir, err := os.MkdirTemp("", "ipc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return filepath.Join(dir, "s")
}

// noLeaks fails the test if any goroutine it started is still running at its end. Call
// it first: cleanups run last-in first-out, so this runs after every other cleanup.
func noLeaks(t *testing.T) {
	t.Helper()
	t.Cleanup(func() { goleak.VerifyNone(t) })
}

// listen starts a server that the test closes at its end.
func listen(t *testing.T, network string, opts ...ipc.Option) *ipc.Server {
	t.Helper()
	srv, err := ipc.Listen(network, address(t, network), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	return srv
}

// dial connects a socket that the test closes at its end.
func dial(t *testing.T, srv *ipc.Server, opts ...ipc.Option) *ipc.Socket {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), wait)
	defer cancel()
	addr := srv.Addr()
	c, err := ipc.Dial(ctx, addr.Network(), addr.String(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// dialRaw connects a plain connection, for a peer that misbehaves.
func dialRaw(t *testing.T, srv *ipc.Server) net.Conn {
	t.Helper()
	var d net.Dialer
	ctx, cancel := context.WithTimeout(t.Context(), wait)
	defer cancel()
	conn, err := d.DialContext(ctx, srv.Addr().Network(), srv.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// accept takes the next socket from the server; the test closes it at its end.
func accept(t *testing.T, srv *ipc.Server) *ipc.Socket {
	t.Helper()
	select {
	case s, ok := <-srv.Connections():
		if !ok {
			t.Fatal("Connections() closed")
		}
		t.Cleanup(func() { _ = s.Close() })
		return s
	case <-time.After(wait):
		t.Fatal("no connection accepted")
	}
	return nil
}

// pair returns the two ends of one connection: the dialled client and the accepted
// server socket.
func pair(t *testing.T, network string, opts ...ipc.Option) (client, server *ipc.Socket) {
	t.Helper()
	srv := listen(t, network, opts...)
	client = dial(t, srv, opts...)
	return client, accept(t, srv)
}

// recv returns the next message on in, failing if none comes or in is closed.
func recv(t *testing.T, in <-chan string) string {
	t.Helper()
	select {
	case m, ok := <-in:
		if !ok {
			t.Fatal("In() closed, want a message")
		}
		return m
	case <-time.After(wait):
		t.Fatal("no message received")
	}
	return ""
}

// send queues msg on out, failing if it blocks.
func send(t *testing.T, out chan<- string, msg string) {
	t.Helper()
	select {
	case out <- msg:
	case <-time.After(wait):
		t.Fatal("send on Out() blocked")
	}
}

// drainUntilClosed reads in until it closes and returns what it read.
func drainUntilClosed(t *testing.T, in <-chan string) []string {
	t.Helper()
	var got []string
	deadline := time.After(wait)
	for {
		select {
		case m, ok := <-in:
			if !ok {
				return got
			}
			got = append(got, m)
		case <-deadline:
			t.Fatalf("In() not closed; read %d messages", len(got))
		}
	}
}

// waitDone waits for the socket to end.
func waitDone(t *testing.T, s *ipc.Socket) {
	t.Helper()
	select {
	case <-s.Done():
	case <-time.After(wait):
		t.Fatal("socket did not end")
	}
}
