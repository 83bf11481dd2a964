package peer

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/router"
)

// stallingSecure hands the server connections that, once stall is called, take no more
// bytes: every write blocks until the connection is closed, as when the peer never
// reads and its receive window is full.
type stallingSecure struct {
	stalled chan struct{}
	once    sync.Once
}

func (s *stallingSecure) stall() { s.once.Do(func() { close(s.stalled) }) }

func (s *stallingSecure) Accept(conn net.Conn) (net.Conn, func(Identity) error, error) {
	return &stallingConn{Conn: conn, stalled: s.stalled, closed: make(chan struct{})}, nil, nil
}

func (s *stallingSecure) Dial(context.Context, func(context.Context) (net.Conn, error), discovery.Member) (net.Conn, error) {
	return nil, errors.New("not for dialling")
}

type stallingConn struct {
	net.Conn
	stalled <-chan struct{}
	closed  chan struct{}
	once    sync.Once
}

func (c *stallingConn) Write(p []byte) (int, error) {
	select {
	case <-c.stalled:
		<-c.closed
		return 0, net.ErrClosed
	default:
		return c.Conn.Write(p)
	}
}

func (c *stallingConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// TestServerShutdownIsBoundedByItsContext: Shutdown asks every inbound link for GOODBYE
// and waits for them within its one context, however many there are: with 50 senders
// whose connections take no more bytes, so that no GOODBYE can be written, it returns
// the context's error once the context ends, having closed every connection — not
// after a wait per link. The bound is asserted loosely (the deadline plus a second), so
// a loaded machine cannot fail it; a wait per link would take several seconds.
func TestServerShutdownIsBoundedByItsContext(t *testing.T) {
	defer goleak.VerifyNone(t)
	spec := discovery.Spec{}.WithDefaults()
	r := router.New(logr.Discard(), nil)
	defer r.Close()
	r.Ensure("orders", spec)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	secure := &stallingSecure{stalled: make(chan struct{})}
	metrics := NewMetrics(nil)
	srv := NewServer(ln, ServerConfig{Self: Identity{"ns", "r", "uid-r", 1}, Router: r, Log: logr.Discard(), Metrics: metrics,
		MaxConnectionsPerIP: 100, Shared: sharesOrders, Secure: secure,
		Authorize: func(Identity, string) string { return "" }})
	start(t.Context(), t, srv)
	defer func() { _ = srv.Close() }()

	const links = 50
	for i := range links {
		conn, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = conn.Close() }()
		h := Hello{MinVersion: MinVersion, MaxVersion: Version, Pod: Identity{"ns", fmt.Sprint("s", i), fmt.Sprint("uid-", i), 1},
			Channels: []string{"orders"}}
		if _, err := conn.Write(h.Frame()); err != nil {
			t.Fatal(err)
		}
		_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		if typ, _, err := ReadHandshake(conn, maxHandshakeBytes); err != nil || typ != FrameWelcome {
			t.Fatalf("link %d: handshake: type %d, %v", i, typ, err)
		}
		// From here on the sender never reads.
	}
	eventuallyTrue(t, "every link up", func() bool {
		return testutil.ToFloat64(metrics.Links.WithLabelValues("in", "up")) == links
	})
	secure.stall()

	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	deadline, _ := ctx.Deadline()
	done := make(chan error, 1)
	go func() { done <- srv.Shutdown(ctx) }()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Shutdown with every GOODBYE blocked returned %v, want the context's error", err)
		}
	case <-time.After(time.Until(deadline) + time.Second):
		t.Errorf("Shutdown with %d blocked GOODBYEs was still running a second past its context's deadline", links)
		t.Logf("Shutdown returned %v at last", <-done)
	}
	if n := testutil.ToFloat64(metrics.Links.WithLabelValues("in", "up")); n != 0 {
		t.Errorf("%v inbound links still up after Shutdown returned", n)
	}
}

// failingListener fails its first accepts with EMFILE, as a sidecar out of file
// descriptors would, then accepts for real.
type failingListener struct {
	net.Listener
	failures atomic.Int32
}

func (l *failingListener) Accept() (net.Conn, error) {
	if l.failures.Add(-1) >= 0 {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: syscall.EMFILE}
	}
	return l.Listener.Accept()
}

// TestServerSurvivesAcceptErrors: the peer port goes on accepting after accept errors
// that do not end the listener (out of file descriptors), with backoff: a sender that
// dials after them is welcomed.
func TestServerSurvivesAcceptErrors(t *testing.T) {
	defer goleak.VerifyNone(t)
	r := router.New(logr.Discard(), nil)
	defer r.Close()
	r.Ensure("orders", discovery.Spec{}.WithDefaults())
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := &failingListener{Listener: inner}
	ln.failures.Store(3)
	srv := NewServer(ln, ServerConfig{Self: Identity{"ns", "r", "uid-r", 1}, Router: r, Log: logr.Discard(),
		Shared: sharesOrders, Authorize: func(Identity, string) string { return "" }})
	start(t.Context(), t, srv)
	defer func() { _ = srv.Close() }()
	conn, err := net.Dial("tcp", inner.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	h := Hello{MinVersion: MinVersion, MaxVersion: Version, Pod: Identity{"ns", "s", "uid-s", 1}, Channels: []string{"orders"}}
	if _, err := conn.Write(h.Frame()); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if typ, _, err := ReadHandshake(conn, maxHandshakeBytes); err != nil || typ != FrameWelcome {
		t.Fatalf("after %d accept errors the peer port answered type %d, %v; want WELCOME", 3, typ, err)
	}
}

// TestLinkShutdownIsBoundedByItsContext: a link whose receiver takes its lines but
// never acknowledges them (it stopped reading its apps, or is wedged) cannot hold
// Shutdown past its context: Shutdown returns the context's error, having closed the
// link, and the lines are counted dropped for reason shutdown, none lost silently.
func TestLinkShutdownIsBoundedByItsContext(t *testing.T) {
	defer goleak.VerifyNone(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	received := make(chan struct{}, 16)
	go func() { // welcomes the link, reads its lines, acknowledges nothing
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer func() { _ = conn.Close() }()
		fr := NewReader(conn, MaxFrameBytes)
		defer fr.Close()
		if typ, _, err := fr.Next(); err != nil || typ != FrameHello {
			return
		}
		w := Welcome{Version: Version, Pod: Identity{"ns", "b", "uid-b", 2}, Presence: map[string]int{"orders": 1}}
		if _, err := conn.Write(w.Frame()); err != nil {
			return
		}
		for {
			typ, _, err := fr.Next()
			if err != nil {
				return
			}
			if typ == FrameData {
				received <- struct{}{}
			}
		}
	}()

	metrics := router.NewMetrics(nil)
	r := router.New(logr.Discard(), metrics)
	defer r.Close()
	spec := discovery.Spec{}.WithDefaults()
	r.Ensure("orders", spec)
	link := NewLink(LinkConfig{Self: Identity{"ns", "a", "uid-a", 1}, LocalIP: "127.0.0.1",
		Member: discovery.Member{Namespace: "ns", Name: "b", UID: "uid-b", IP: "127.0.0.1",
			PeerPort: ln.Addr().(*net.TCPAddr).Port, Ready: true, Serving: true},
		Channels: func() []string { return []string{"orders"} }, Router: r, Log: logr.Discard(), Keepalive: time.Second})
	start(t.Context(), t, link)
	for _, l := range []string{"one", "two", "three"} {
		if res, reason := link.Send(t.Context(), "orders", router.Line, buffer.Payload{Data: []byte(l)}, false, spec.Overflow); res != router.Queued {
			t.Fatalf("%s not queued: %s", l, reason)
		}
	}
	for range 3 {
		select {
		case <-received:
		case <-time.After(10 * time.Second):
			t.Fatal("the receiver never got the lines")
		}
	}

	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	deadline, _ := ctx.Deadline()
	done := make(chan error, 1)
	go func() { done <- link.Shutdown(ctx) }()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Shutdown with nothing acknowledged returned %v, want the context's error", err)
		}
	case <-time.After(time.Until(deadline) + time.Second):
		t.Errorf("Shutdown of a link nobody acknowledges was still running a second past its context's deadline")
		t.Logf("Shutdown returned %v at last", <-done)
	}
	if n := testutil.ToFloat64(metrics.Dropped.WithLabelValues("orders", router.ReasonShutdown)); n != 3 {
		t.Errorf("%v lines counted dropped shutdown, want the 3 unacknowledged", n)
	}
}
