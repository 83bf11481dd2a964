package peer

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"go.uber.org/goleak"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/router"
)

// The peer protocol promises that release N and N-1 interoperate (docs/protocol.md):
// the two ends use the highest version both speak, a later version's extra fields at
// the end of HELLO and WELCOME are ignored, and frame types an end does not know are
// skipped. These tests play the newer release by hand against this one, in both
// directions, since this release is the N-1 of the next.

// withTrailer returns the frame f with extra bytes at the end of its body, as a later
// version that adds fields would send it.
func withTrailer(f []byte, extra ...byte) []byte {
	return frame(FrameType(f[4]), func(b []byte) []byte { return append(append(b, f[headerLen:]...), extra...) })
}

// futureFrame is a frame of a type this release does not know.
func futureFrame() []byte {
	return frame(FrameType(99), func(b []byte) []byte { return append(b, "a later version's frame"...) })
}

// TestServerSpeaksToANewerSender: a sender speaking versions 1–2, with a longer HELLO and
// a frame type unknown here between its lines, gets version 1 and every line delivered
// and acknowledged; a sender that no longer speaks version 1 is refused with the reason.
func TestServerSpeaksToANewerSender(t *testing.T) {
	defer goleak.VerifyNone(t)
	r := router.New(logr.Discard(), nil)
	defer r.Close()
	spec := discovery.Spec{}.WithDefaults()
	local := r.Ensure("orders", spec).Attach(router.Line, "", func() {})
	defer local.Detach()
	lines := make(chan string, 10)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	drained := drainLocal(ctx, local, func(data []byte) { lines <- string(data) })
	defer func() { cancel(); <-drained }()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(ln, ServerConfig{Self: Identity{"ns", "b", "uid-b", 2}, Router: r, Log: logr.Discard(),
		Authorize: func(Identity, string) string { return "" }, Shared: sharesOrders})
	start(t.Context(), t, srv)
	defer func() { _ = srv.Close() }()

	hello := func(minV, maxV uint16) []byte {
		h := Hello{MinVersion: minV, MaxVersion: maxV, Pod: Identity{"ns", "a", "uid-a", 1}, Channels: []string{"orders"}}
		return withTrailer(h.Frame(), 0xde, 0xad) // fields of version 2
	}

	t.Run("versions 1-2", func(t *testing.T) {
		conn, fr := dialPeer(t, ln.Addr().String(), hello(1, 2))
		typ, body, err := fr.Next()
		if err != nil || typ != FrameWelcome {
			t.Fatalf("reply: type %d, %v; want WELCOME", typ, err)
		}
		if w, err := ParseWelcome(body); err != nil || w.Version != 1 {
			t.Fatalf("WELCOME = %+v, %v; want version 1", w, err)
		}
		var out []byte
		for i, line := range []string{"one", "two", "three"} {
			out = AppendDataHeader(out, uint64(i+1), "orders", router.Line, len(line))
			out = append(out, line...)
			out = append(out, futureFrame()...)
		}
		if _, err := conn.Write(out); err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"one", "two", "three"} {
			select {
			case got := <-lines:
				if got != want {
					t.Fatalf("delivered %q, want %q", got, want)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("%q never delivered", want)
			}
		}
		if seq := nextAck(t, fr); seq != 3 {
			t.Fatalf("ACK %d, want 3", seq)
		}
	})

	t.Run("versions 2-3", func(t *testing.T) {
		_, fr := dialPeer(t, ln.Addr().String(), hello(2, 3))
		typ, body, err := fr.Next()
		if err != nil || typ != FrameRefuse {
			t.Fatalf("reply: type %d, %v; want REFUSE", typ, err)
		}
		if reason, _ := ParseReason(body); !strings.Contains(reason, "no common protocol version") {
			t.Fatalf("refused for %q", reason)
		}
	})
}

// TestLinkSpeaksToANewerReceiver: a receiver of the next release answers this release's
// HELLO with version 1 and a longer WELCOME, and sends frame types unknown here among its
// acknowledgements; the link delivers every line once and drains.
func TestLinkSpeaksToANewerReceiver(t *testing.T) {
	defer goleak.VerifyNone(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	lines := make(chan string, 10)
	receiverDone := make(chan error, 1)
	go func() { receiverDone <- newerReceiver(ln, lines) }()

	r := router.New(logr.Discard(), nil)
	defer r.Close()
	spec := discovery.Spec{}.WithDefaults()
	r.Ensure("orders", spec)
	port := ln.Addr().(*net.TCPAddr).Port
	link := NewLink(LinkConfig{Self: Identity{"ns", "a", "uid-a", 1}, LocalIP: "127.0.0.1",
		Member:   discovery.Member{Namespace: "ns", Name: "b", UID: "uid-b", IP: "127.0.0.1", PeerPort: port, Ready: true, Serving: true},
		Channels: func() []string { return []string{"orders"} }, Router: r, Log: logr.Discard(), Keepalive: time.Second})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	start(ctx, t, link)
	for _, l := range []string{"one", "two", "three"} {
		if res, reason := link.Send(ctx, "orders", router.Line, buffer.Payload{Data: []byte(l)}, false, spec.Overflow); res != router.Queued {
			t.Fatalf("%s not queued: %s", l, reason)
		}
	}
	for _, want := range []string{"one", "two", "three"} {
		select {
		case got := <-lines:
			if got != want {
				t.Fatalf("received %q, want %q", got, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%q never arrived", want)
		}
	}
	if n, up := link.Presence("orders"); !up || n != 1 {
		t.Fatalf("presence %d, up %v; want 1 connection advertised by the newer receiver", n, up)
	}
	drainCtx, drainCancel := context.WithTimeout(ctx, 5*time.Second)
	err = link.Shutdown(drainCtx) // every line acknowledged, then GOODBYE
	drainCancel()
	if err != nil {
		t.Fatal("the lines were never all acknowledged")
	}
	if err := <-receiverDone; err != nil {
		t.Fatal(err)
	}
}

// newerReceiver accepts one link as the next release would: version 1 chosen, a WELCOME
// with a trailing field, an unknown frame before every ACK.
func newerReceiver(ln net.Listener, lines chan<- string) error {
	conn, err := ln.Accept()
	if err != nil {
		return err
	}
	defer func() { _ = conn.Close() }()
	fr := NewReader(conn, MaxFrameBytes)
	defer fr.Close()
	if typ, _, err := fr.Next(); err != nil || typ != FrameHello {
		return err
	}
	w := Welcome{Version: 1, Pod: Identity{"ns", "b", "uid-b", 2}, Presence: map[string]int{"orders": 1}}
	if _, err := conn.Write(withTrailer(w.Frame(), 1, 2, 3)); err != nil {
		return err
	}
	for {
		typ, body, err := fr.Next()
		if err != nil {
			return nil // the link closed after draining
		}
		switch typ {
		case FrameData:
			d, err := ParseData(body)
			if err != nil {
				return err
			}
			lines <- string(d.Payload)
			reply := append(futureFrame(), AckFrame(nil, d.Seq)...)
			if _, err := conn.Write(reply); err != nil {
				return err
			}
		case FrameGoodbye:
			return nil
		}
	}
}

// dialPeer connects to addr and sends first (a HELLO); it returns the connection and a
// reader of the replies.
func dialPeer(t *testing.T, addr string, first []byte) (net.Conn, *Reader) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write(first); err != nil {
		t.Fatal(err)
	}
	fr := NewReader(conn, MaxFrameBytes)
	t.Cleanup(fr.Close)
	return conn, fr
}

// nextAck skips frames until an ACK and returns its sequence number.
func nextAck(t *testing.T, fr *Reader) uint64 {
	t.Helper()
	for {
		typ, body, err := fr.Next()
		if err != nil {
			t.Fatal(err)
		}
		if typ == FrameAck {
			seq, err := ParseAck(body)
			if err != nil {
				t.Fatal(err)
			}
			return seq
		}
	}
}
