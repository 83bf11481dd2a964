package peer

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
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
// directions, since this release is the N-1 of the next; and the previous release
// (version 1, which has no RUN frames), since this one is the N of it.

// withTrailer returns the frame f with extra bytes at the end of its body, as a later
// version that adds fields would send it.
func withTrailer(f []byte, extra ...byte) []byte {
	return frame(FrameType(f[4]), func(b []byte) []byte { return append(append(b, f[headerLen:]...), extra...) })
}

// futureFrame is a frame of a type this release does not know.
func futureFrame() []byte {
	return frame(FrameType(99), func(b []byte) []byte { return append(b, "a later version's frame"...) })
}

// TestServerSpeaksToANewerSender: a sender speaking versions 2–3, with a longer HELLO and
// a frame type unknown here between its lines, gets version 2 and every line delivered
// and acknowledged, from DATA and RUN frames alike; a sender of the previous release
// (version 1 only) gets version 1 and its DATA frames delivered; a sender that no longer
// speaks version 2 is refused with the reason.
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
		if maxV > Version {
			return withTrailer(h.Frame(), 0xde, 0xad) // fields of a later version
		}
		return h.Frame()
	}
	expect := func(t *testing.T, want ...string) {
		t.Helper()
		for _, w := range want {
			select {
			case got := <-lines:
				if got != w {
					t.Fatalf("delivered %q, want %q", got, w)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("%q never delivered", w)
			}
		}
	}
	incarnation := uint64(0)
	for _, tc := range []struct {
		name       string
		minV, maxV uint16
		version    uint16
		runs       bool
	}{
		{"versions 2-3", 2, 3, 2, true},
		{"version 1 (the previous release)", 1, 1, 1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			incarnation++
			h := Hello{MinVersion: tc.minV, MaxVersion: tc.maxV, Pod: Identity{"ns", "a", "uid-a", incarnation}, Channels: []string{"orders"}}
			f := h.Frame()
			if tc.maxV > Version {
				f = withTrailer(f, 0xde, 0xad)
			}
			conn, fr := dialPeer(t, ln.Addr().String(), f)
			typ, body, err := fr.Next()
			if err != nil || typ != FrameWelcome {
				t.Fatalf("reply: type %d, %v; want WELCOME", typ, err)
			}
			if w, err := ParseWelcome(body); err != nil || w.Version != tc.version {
				t.Fatalf("WELCOME = %+v, %v; want version %d", w, err, tc.version)
			}
			var out []byte
			for i, line := range []string{"one", "two", "three"} {
				out = AppendDataHeader(out, uint64(i+1), "orders", router.Line, len(line))
				out = append(out, line...)
				out = append(out, futureFrame()...)
			}
			if tc.runs {
				out = appendRun(out, 4, 3, newChanState("orders").tail[router.Line], []byte("four\nfive\nsix\n"))
			}
			if _, err := conn.Write(out); err != nil {
				t.Fatal(err)
			}
			expect(t, "one", "two", "three")
			last := uint64(3)
			if tc.runs {
				expect(t, "four", "five", "six")
				last = 6
			}
			for seq := nextAck(t, fr); seq != last; seq = nextAck(t, fr) {
				if seq > last {
					t.Fatalf("ACK %d, want %d", seq, last)
				}
			}
		})
	}

	t.Run("versions 3-4", func(t *testing.T) {
		_, fr := dialPeer(t, ln.Addr().String(), hello(3, 4))
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
// HELLO with version 2 and a longer WELCOME, and sends frame types unknown here among its
// acknowledgements; a receiver of the previous release answers with version 1. The link
// delivers every line once, in order, and drains; the lines of one app read go as RUN
// frames to the first and as DATA frames only to the second, which has no RUN.
func TestLinkSpeaksToANewerReceiver(t *testing.T) {
	for _, tc := range []struct {
		name    string
		version uint16
	}{{"versions 2-3", 2}, {"version 1 (the previous release)", 1}} {
		t.Run(tc.name, func(t *testing.T) { testLinkSpeaksTo(t, tc.version) })
	}
}

func testLinkSpeaksTo(t *testing.T, version uint16) {
	defer goleak.VerifyNone(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	lines := make(chan string, 10)
	var runs atomic.Int32
	receiverDone := make(chan error, 1)
	go func() { receiverDone <- otherReceiver(ln, version, lines, &runs) }()

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
	// Copied as the endpoint copies an app read's lines: a run.
	var slab buffer.Slab
	defer slab.Close()
	var batch []buffer.Payload
	for _, l := range []string{"four", "five", "six"} {
		batch = append(batch, slab.CopyLine([]byte(l), '\n'))
	}
	if n, _, reason := link.SendBatch(ctx, "orders", router.Line, batch, spec.Overflow); n != len(batch) {
		t.Fatalf("%d of %d queued: %s", n, len(batch), reason)
	}
	slab.Recycle()
	for _, want := range []string{"one", "two", "three", "four", "five", "six"} {
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
		t.Fatalf("presence %d, up %v; want 1 connection advertised by the receiver", n, up)
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
	if got, want := runs.Load() > 0, version >= VersionRun; got != want {
		t.Fatalf("version %d receiver got RUN frames: %v, want %v", version, got, want)
	}
}

// otherReceiver accepts one link as another release would: version chosen, a WELCOME
// with a trailing field, an unknown frame before every ACK. It counts the RUN frames it
// reads in runs.
func otherReceiver(ln net.Listener, version uint16, lines chan<- string, runs *atomic.Int32) error {
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
	w := Welcome{Version: version, Pod: Identity{"ns", "b", "uid-b", 2}, Presence: map[string]int{"orders": 1}}
	if _, err := conn.Write(withTrailer(w.Frame(), 1, 2, 3)); err != nil {
		return err
	}
	for {
		typ, body, err := fr.Next()
		if err != nil {
			return nil // the link closed after draining
		}
		var last uint64
		switch typ {
		case FrameData:
			d, err := ParseData(body)
			if err != nil {
				return err
			}
			lines <- string(d.Payload)
			last = d.Seq
		case FrameRun:
			if version < VersionRun {
				return fmt.Errorf("a RUN frame on a version %d link", version)
			}
			r, err := ParseRun(body)
			if err != nil {
				return err
			}
			runs.Add(1)
			for _, l := range strings.SplitAfter(string(r.Payload), "\n") {
				if l != "" {
					lines <- strings.TrimSuffix(l, "\n")
				}
			}
			last = r.Last()
		case FrameGoodbye:
			return nil
		default:
			continue
		}
		reply := append(futureFrame(), AckFrame(nil, last)...)
		if _, err := conn.Write(reply); err != nil {
			return err
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
