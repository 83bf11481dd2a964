package peer

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/router"
)

// testServer is a real Server on loopback with a real router: channel orders is shared
// with the member uid-a and has a local reader; channel secret is served but not
// shared with it.
type testServer struct {
	srv     *Server
	metrics *Metrics
	rmet    *router.Metrics
	lines   chan string
	addr    string
	// authorize, if set, replaces the member check (to make it panic).
	authorize atomic.Pointer[func(Identity, string) string]
}

func newTestServer(tb testing.TB, maxMessageBytes int) *testServer {
	tb.Helper()
	spec := discovery.Spec{MaxMessageBytes: maxMessageBytes,
		Overflow: discovery.Overflow{Policy: discovery.WaitThenDrop, MaxWait: 10 * time.Millisecond, QueueBytes: 1 << 20}}.WithDefaults()
	ts := &testServer{metrics: NewMetrics(nil), rmet: router.NewMetrics(nil), lines: make(chan string, 1024)}
	r := router.New(logr.Discard(), ts.rmet)
	local := r.Ensure("orders", spec).Attach(router.Line, "", func() {})
	r.Ensure("secret", spec).Attach(router.Line, "", func() {})
	ctx, cancel := context.WithCancel(context.Background())
	drained := drainLocal(ctx, local, func(data []byte) {
		select {
		case ts.lines <- string(data):
		default:
		}
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	ts.addr = ln.Addr().String()
	ts.srv = NewServer(ln, ServerConfig{Self: Identity{"ns", "b", "uid-b", 2}, Router: r, Log: logr.Discard(),
		Metrics: ts.metrics, Keepalive: time.Second, MaxConnectionsPerIP: 1000, Shared: sharesOrders,
		Authorize: func(id Identity, ip string) string {
			if f := ts.authorize.Load(); f != nil {
				return (*f)(id, ip)
			}
			if id.UID != "uid-a" {
				return "not a member"
			}
			return ""
		}})
	start(ctx, tb, ts.srv)
	tb.Cleanup(func() {
		_ = ts.srv.Close()
		cancel()
		<-drained
		r.Close()
	})
	return ts
}

var incarnations atomic.Uint64

// join dials the server as uid-a, a fresh incarnation, and returns the connection
// after WELCOME.
func (ts *testServer) join(tb testing.TB) (net.Conn, Welcome) {
	tb.Helper()
	conn, err := net.Dial("tcp", ts.addr)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	h := Hello{MinVersion: MinVersion, MaxVersion: Version, Pod: Identity{"ns", "a", "uid-a", incarnations.Add(1)}, Channels: []string{"orders"}}
	if _, err := conn.Write(h.Frame()); err != nil {
		tb.Fatal(err)
	}
	typ, body, err := ReadHandshake(conn, maxHandshakeBytes)
	if err != nil || typ != FrameWelcome {
		tb.Fatalf("handshake: type %d, %v", typ, err)
	}
	w, err := ParseWelcome(body)
	if err != nil {
		tb.Fatal(err)
	}
	return conn, w
}

func data(seq uint64, channel string, payload string) []byte {
	b := AppendDataHeader(nil, seq, channel, router.Line, len(payload))
	return append(b, payload...)
}

// run is a RUN frame of count line messages, payload being their bytes as sent (each
// meant to end with '\n'): a hostile sender may declare any count for any bytes.
func run(seq uint64, count int, channel string, payload string) []byte {
	return appendRun(nil, seq, count, newChanState(channel).tail[router.Line], []byte(payload))
}

// FuzzServer sends whatever frames the fuzzer makes up, after an honest handshake, to
// a real Server and router. None may panic (a recovered panic is counted, and fails
// the target), and the server must end or go on with the connection, never hang:
// once the input is sent and the write side closed, it closes the connection.
func FuzzServer(f *testing.F) {
	var valid []byte
	valid = append(valid, data(1, "orders", "one")...)
	valid = append(valid, PingFrame()...)
	valid = append(valid, data(2, "secret", "two")...)
	valid = append(valid, data(3, "orders", "three")...)
	f.Add(valid)
	f.Add(data(1, "\xff", "boom"))
	f.Add(data(1, "nope", strings.Repeat("x", 5000)))
	f.Add(append(data(1, "orders", "x"), data(7, "orders", "y")...))
	f.Add(append(run(1, 3, "orders", "a\nb\nc\n"), run(4, 2, "orders", "d\ne")...))
	f.Add(run(1<<63, 1<<62, "orders", "x\n"))
	f.Add(AckFrame(nil, 1<<62))
	f.Add(append(PresenceFrame(map[string]int{"orders": 3}), ReasonFrame(FrameGoodbye, "bye")...))
	f.Add([]byte{0, 0, 0, 0})
	f.Add([]byte{0, 0x10, 0, 0, byte(FrameData), 1})
	ts := newTestServer(f, 4096)
	f.Fuzz(func(t *testing.T, frames []byte) {
		conn, _ := ts.join(t)
		_, _ = conn.Write(frames)
		_ = conn.(*net.TCPConn).CloseWrite()
		if _, err := io.Copy(io.Discard, conn); err != nil {
			t.Fatalf("the server did not end the connection: %v", err)
		}
		if n := testutil.ToFloat64(ts.metrics.Panics.WithLabelValues("in")); n > 0 {
			t.Fatalf("%v panics", n)
		}
	})
}

// TestServerAdmitsOnlySharedChannels: DATA for a channel the member does not share is
// dropped and counted not_shared — under the channel's name if served, under _other
// if not — and the link goes on; presence names only shared channels.
func TestServerAdmitsOnlySharedChannels(t *testing.T) {
	ts := newTestServer(t, 4096)
	conn, w := ts.join(t)
	if _, ok := w.Presence["secret"]; ok || w.Presence["orders"] != 1 {
		t.Fatalf("WELCOME presence %v, want only orders", w.Presence)
	}
	var b []byte
	b = append(b, data(1, "secret", "injected")...)
	b = append(b, data(2, "unknown", "x")...)
	b = append(b, data(3, "orders", "hello")...)
	if _, err := conn.Write(b); err != nil {
		t.Fatal(err)
	}
	fr := NewReader(conn, MaxFrameBytes)
	defer fr.Close()
	for nextAck(t, fr) < 3 {
	}
	if got := <-ts.lines; got != "hello" {
		t.Fatalf("delivered %q, want hello", got)
	}
	for ch, want := range map[string]float64{"secret": 1, router.OtherChannel: 1, "unknown": 0} {
		if got := testutil.ToFloat64(ts.rmet.Dropped.WithLabelValues(ch, ReasonNotShared)); got != want {
			t.Errorf("not_shared drops of %s = %v, want %v", ch, got, want)
		}
	}
}

// TestServerProtocolErrors: each invalid frame ends the link, counted with its reason;
// a line over maxMessageBytes is only dropped (too_large) and the link goes on.
func TestServerProtocolErrors(t *testing.T) {
	ts := newTestServer(t, 100)
	cases := map[string]struct {
		frame  []byte
		reason string
	}{
		"channel 0xff":  {data(1, "\xff", "x"), ReasonChannelName},
		"empty channel": {data(1, "", "x"), ReasonChannelName},
		// The name is checked only when the shared-channel lookup misses.
		"64 byte channel": {data(1, strings.Repeat("a", 64), "x"), ReasonChannelName},
		"kind":            {append(AppendDataHeader(nil, 1, "orders", router.Kind(3), 1), 'x'), ReasonKind},
		// The bound is the channels' maxMessageBytes (100) but never below a RUN's.
		"frame over 8+1 KiB": {data(1, "orders", strings.Repeat("x", MaxRunBytes+DataOverhead)), ReasonFrameSize},
		"truncated":          {[]byte{0, 0, 0, 2, byte(FrameData), 0x80}, ReasonMalformed},
		// A RUN must hold exactly its count of messages, each ended by its delimiter:
		// a sender cannot smuggle a line break into a line, nor make the receiver split
		// off more or fewer messages than it numbered.
		"run smuggling a line":             {run(1, 1, "orders", "a\nb\n"), ReasonRun},
		"run short of its count":           {run(1, 3, "orders", "a\nb\n"), ReasonRun},
		"run unterminated":                 {run(1, 2, "orders", "a\nb"), ReasonRun},
		"run of none":                      {run(1, 0, "orders", "\n"), ReasonRun},
		"run over its bytes":               {run(1, 5, "orders", "a\n"), ReasonRun},
		"run wrapping seq":                 {run(1<<64-2, 3, "orders", "a\nb\nc\n"), ReasonRun},
		"run of a nodeipc kind with lines": {appendRun(nil, 1, 1, newChanState("orders").tail[router.NodeIPC], []byte("a\n")), ReasonRun},
		"run bad name":                     {run(1, 1, "\xff", "x\n"), ReasonChannelName},
		// (On a channel not shared, so that no line reaches the reader the other cases
		// share: the sequence is checked before the channel.)
		"run overlapping": {append(run(1, 2, "secret", "a\nb\n"), run(2, 2, "secret", "b\nc\n")...), ReasonSequence},
		"run after a gap": {append(run(1, 2, "secret", "a\nb\n"), run(4, 1, "secret", "d\n")...), ReasonSequence},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			conn, _ := ts.join(t)
			before := testutil.ToFloat64(ts.metrics.ProtocolErrors.WithLabelValues("in", tc.reason))
			if _, err := conn.Write(tc.frame); err != nil {
				t.Fatal(err)
			}
			// The server closes as soon as it has read the bad header; what the
			// attacker sent after it is left unread, so the close may come as a
			// reset instead of an end of stream. Either ends the link.
			if _, err := io.Copy(io.Discard, conn); err != nil && !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("link not ended: %v", err)
			}
			eventuallyTrue(t, "counted", func() bool {
				return testutil.ToFloat64(ts.metrics.ProtocolErrors.WithLabelValues("in", tc.reason)) == before+1
			})
		})
	}
	t.Run("bad name after a shared line", func(t *testing.T) {
		conn, _ := ts.join(t)
		before := testutil.ToFloat64(ts.metrics.ProtocolErrors.WithLabelValues("in", ReasonChannelName))
		if _, err := conn.Write(append(data(1, "orders", "first"), data(2, "\xff", "x")...)); err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(io.Discard, conn); err != nil {
			t.Fatalf("link not ended: %v", err)
		}
		if got := <-ts.lines; got != "first" {
			t.Fatalf("delivered %q, want first", got)
		}
		eventuallyTrue(t, "counted", func() bool {
			return testutil.ToFloat64(ts.metrics.ProtocolErrors.WithLabelValues("in", ReasonChannelName)) == before+1
		})
	})
	t.Run("too large", func(t *testing.T) {
		conn, _ := ts.join(t)
		before := testutil.ToFloat64(ts.rmet.Dropped.WithLabelValues("orders", ReasonTooLarge))
		b := append(data(1, "orders", strings.Repeat("x", 101)), data(2, "orders", "fits")...)
		if _, err := conn.Write(b); err != nil {
			t.Fatal(err)
		}
		if got := <-ts.lines; got != "fits" {
			t.Fatalf("delivered %q", got)
		}
		if got := testutil.ToFloat64(ts.rmet.Dropped.WithLabelValues("orders", ReasonTooLarge)); got != before+1 {
			t.Fatalf("too_large = %v, want %v", got, before+1)
		}
	})
	// A RUN's messages are held to maxMessageBytes one by one: the line over it is
	// dropped, its neighbours delivered, and every sequence number acknowledged.
	t.Run("too large in a run", func(t *testing.T) {
		conn, _ := ts.join(t)
		before := testutil.ToFloat64(ts.rmet.Dropped.WithLabelValues("orders", ReasonTooLarge))
		payload := "before\n" + strings.Repeat("x", 101) + "\nafter\n"
		b := append(run(1, 3, "orders", payload), run(1, 3, "orders", payload)...)
		if _, err := conn.Write(append(b, data(4, "orders", "next")...)); err != nil {
			t.Fatal(err)
		}
		// The retransmitted run is skipped: the line after "after" is "next".
		for _, want := range []string{"before", "after", "next"} {
			select {
			case got := <-ts.lines:
				if got != want {
					t.Fatalf("delivered %q, want %q", got, want)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("%q never delivered", want)
			}
		}
		fr := NewReader(conn, MaxFrameBytes)
		defer fr.Close()
		for seq := nextAck(t, fr); seq != 4; seq = nextAck(t, fr) {
			if seq > 4 {
				t.Fatalf("ACK %d, want 4", seq)
			}
		}
		if got := testutil.ToFloat64(ts.rmet.Dropped.WithLabelValues("orders", ReasonTooLarge)); got != before+1 {
			t.Fatalf("too_large = %v, want %v (the retransmitted run is skipped)", got, before+1)
		}
	})
}

// TestServerRecoversPanics: a panic in a connection's goroutine is counted and ends
// only that connection; the server goes on accepting.
func TestServerRecoversPanics(t *testing.T) {
	ts := newTestServer(t, 4096)
	boom := func(Identity, string) string { panic("boom") }
	ts.authorize.Store(&boom)
	conn, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	h := Hello{MinVersion: MinVersion, MaxVersion: Version, Pod: Identity{"ns", "a", "uid-a", 1}}
	if _, err := conn.Write(h.Frame()); err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(io.Discard, conn); err != nil {
		t.Fatalf("connection not closed: %v", err)
	}
	if n := testutil.ToFloat64(ts.metrics.Panics.WithLabelValues("in")); n != 1 {
		t.Fatalf("panics = %v, want 1", n)
	}
	ts.authorize.Store(nil)
	c2, _ := ts.join(t)
	if _, err := c2.Write(data(1, "orders", "after")); err != nil {
		t.Fatal(err)
	}
	if got := <-ts.lines; got != "after" {
		t.Fatalf("delivered %q", got)
	}
}

// TestServerConnectionCaps: connections beyond the per-address cap are refused at once
// and counted; an idle one ends at the handshake deadline, counted.
func TestServerConnectionCaps(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := NewMetrics(nil)
	srv := NewServer(ln, ServerConfig{Router: router.New(logr.Discard(), nil), Log: logr.Discard(), Metrics: m,
		MaxConnections: 3, MaxConnectionsPerIP: 2, HandshakeTimeout: 200 * time.Millisecond,
		Authorize: func(Identity, string) string { return "" }})
	start(t.Context(), t, srv)
	defer func() { _ = srv.Close() }()
	var conns []net.Conn
	for range 4 {
		conn, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = conn.Close() }()
		conns = append(conns, conn)
	}
	eventuallyTrue(t, "two refused", func() bool {
		return testutil.ToFloat64(m.Refused.WithLabelValues(RefusedSourceLimit)) == 2
	})
	for _, conn := range conns {
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		typ, body, err := ReadHandshake(conn, maxHandshakeBytes)
		if err != nil || typ != FrameRefuse {
			t.Fatalf("got %d, %v; want REFUSE", typ, err)
		}
		t.Logf("refused: %s", body[1:])
	}
	eventuallyTrue(t, "two handshake timeouts", func() bool {
		return testutil.ToFloat64(m.Refused.WithLabelValues(RefusedHandshakeTimeout)) == 2
	})
}

// TestReaderDoesNotAllocateDeclaredLength: a frame that declares 16 MiB (or a HELLO
// that declares 64 KiB) and sends a few bytes costs about what arrived, not what was
// declared.
func TestReaderDoesNotAllocateDeclaredLength(t *testing.T) {
	stream := func(declared int) []byte {
		b := binary.BigEndian.AppendUint32(nil, uint32(declared))
		return append(append(b, byte(FrameData)), bytes.Repeat([]byte{1}, 100)...)
	}
	cases := map[string]struct {
		read     func(io.Reader) error
		declared int
		bound    uint64
	}{
		// The Reader's own 64 KiB chunk is allocated whatever the frame.
		"Reader, 16 MiB": {func(r io.Reader) error { _, _, err := NewReader(r, MaxFrameBytes).Next(); return err }, 16 << 20, 256 << 10},
		"HELLO, 64 KiB":  {func(r io.Reader) error { _, _, err := ReadHandshake(r, maxHandshakeBytes); return err }, maxHandshakeBytes, 16 << 10},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			src := bytes.NewReader(stream(tc.declared))
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			err := tc.read(src)
			runtime.ReadMemStats(&after)
			if !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("err = %v, want unexpected EOF", err)
			}
			if got := after.TotalAlloc - before.TotalAlloc; got > tc.bound {
				t.Fatalf("allocated %d bytes for a frame that sent 100, the bound is %d", got, tc.bound)
			}
		})
	}
}

// TestDecodeValidatesFields: every string of every frame is checked at decode.
func TestDecodeValidatesFields(t *testing.T) {
	good := Identity{"ns", "pod-a.x", "0f3c-uid", 1}
	cases := map[string]struct {
		parse  func() error
		reason string
	}{
		"hello channel": {func() error {
			_, err := ParseHello(Hello{1, 1, good, []string{"ok", "Bad"}}.Frame()[headerLen:])
			return err
		}, ReasonChannelName},
		"hello namespace": {func() error {
			_, err := ParseHello(Hello{1, 1, Identity{"\xff", "a", "u", 1}, nil}.Frame()[headerLen:])
			return err
		}, ReasonMalformed},
		"hello name": {func() error {
			_, err := ParseHello(Hello{1, 1, Identity{"ns", "", "u", 1}, nil}.Frame()[headerLen:])
			return err
		}, ReasonMalformed},
		"hello uid": {func() error {
			_, err := ParseHello(Hello{1, 1, Identity{"ns", "a", "u u", 1}, nil}.Frame()[headerLen:])
			return err
		}, ReasonMalformed},
		"presence name": {func() error {
			_, err := ParsePresence(PresenceFrame(map[string]int{strings.Repeat("a", 64): 1})[headerLen:])
			return err
		}, ReasonChannelName},
		"welcome known": {func() error {
			b := Welcome{1, good, false, 0, nil}.Frame()[headerLen:]
			b[len(b)-10] = 2 // the known byte: before lastSeq and an empty presence
			_, err := ParseWelcome(b)
			return err
		}, ReasonMalformed},
		"reason utf8": {func() error { _, err := ParseReason([]byte{2, 0xff, 0xfe}); return err }, ReasonMalformed},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			var pe *ProtocolError
			if err := tc.parse(); !errors.As(err, &pe) || pe.Reason != tc.reason || !errors.Is(err, ErrFrame) {
				t.Fatalf("err = %v, want a %s protocol error", err, tc.reason)
			}
		})
	}
	if _, err := ParseHello(Hello{1, 1, good, []string{"orders", "a-1"}}.Frame()[headerLen:]); err != nil {
		t.Fatalf("a valid HELLO: %v", err)
	}
}

// TestLinkDistrustsItsReceiver: a receiver that acknowledges, or claims in WELCOME to
// have received, more than the link sent ends the link with a counted protocol error,
// and settles nothing: the next session gets every line.
func TestLinkDistrustsItsReceiver(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	r := router.New(logr.Discard(), nil)
	defer r.Close()
	spec := discovery.Spec{}.WithDefaults()
	r.Ensure("orders", spec)
	m := NewMetrics(nil)
	link := NewLink(LinkConfig{Self: Identity{"ns", "a", "uid-a", 1}, LocalIP: "127.0.0.1", Metrics: m,
		Member:   discovery.Member{Namespace: "ns", Name: "b", UID: "uid-b", IP: "127.0.0.1", PeerPort: ln.Addr().(*net.TCPAddr).Port, Ready: true, Serving: true},
		Channels: func() []string { return []string{"orders"} }, Router: r, Log: logr.Discard(), Keepalive: time.Second})
	start(t.Context(), t, link)
	defer func() { _ = link.Close() }()
	for _, l := range []string{"one", "two", "three"} {
		if res, reason := link.Send(t.Context(), "orders", router.Line, buffer.Payload{Data: []byte(l)}, false, spec.Overflow); res != router.Queued {
			t.Fatalf("%s not queued: %s", l, reason)
		}
	}
	// session accepts the link's next connection and answers its HELLO with w.
	session := func(w Welcome) (net.Conn, *Reader) {
		t.Helper()
		conn, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = conn.Close() })
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		if typ, _, err := ReadHandshake(conn, maxHandshakeBytes); err != nil || typ != FrameHello {
			t.Fatalf("HELLO: %d, %v", typ, err)
		}
		if _, err := conn.Write(w.Frame()); err != nil {
			t.Fatal(err)
		}
		fr := NewReader(conn, MaxFrameBytes)
		t.Cleanup(fr.Close)
		return conn, fr
	}
	lines := func(fr *Reader) []string {
		t.Helper()
		var got []string
		for len(got) < 3 {
			typ, body, err := fr.Next()
			if err != nil {
				t.Fatal(err)
			}
			if typ == FrameData {
				d, err := ParseData(body)
				if err != nil {
					t.Fatal(err)
				}
				got = append(got, fmt.Sprintf("%d:%s", d.Seq, d.Payload))
			}
		}
		return got
	}
	ended := func(conn net.Conn, reason string) {
		t.Helper()
		if _, err := io.Copy(io.Discard, conn); err != nil {
			t.Fatalf("the link did not end: %v", err)
		}
		eventuallyTrue(t, reason+" counted", func() bool { return testutil.ToFloat64(m.ProtocolErrors.WithLabelValues("out", reason)) == 1 })
	}
	want := "[1:one 2:two 3:three]"
	receiver := Identity{"ns", "b", "uid-b", 9}
	conn, fr := session(Welcome{Version: 1, Pod: receiver})
	if got := fmt.Sprint(lines(fr)); got != want {
		t.Fatalf("first session got %s", got)
	}
	if _, err := conn.Write(AckFrame(nil, 1<<62)); err != nil {
		t.Fatal(err)
	}
	ended(conn, ReasonAck)
	conn, _ = session(Welcome{Version: 1, Pod: receiver, Known: true, LastSeq: 4})
	ended(conn, ReasonLastSeq)
	_, fr = session(Welcome{Version: 1, Pod: receiver, Known: true})
	if got := fmt.Sprint(lines(fr)); got != want {
		t.Fatalf("the honest session got %s, want every line again", got)
	}
}

// TestLinkContinuesAnEarlierLinksNumbering: a receiver that remembers this incarnation
// from an earlier link (the member left and came back) gets the new link's lines after
// its lastSeq, so it neither skips them as retransmissions nor settles them unseen.
func TestLinkContinuesAnEarlierLinksNumbering(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	r := router.New(logr.Discard(), nil)
	defer r.Close()
	spec := discovery.Spec{}.WithDefaults()
	r.Ensure("orders", spec)
	link := NewLink(LinkConfig{Self: Identity{"ns", "a", "uid-a", 1}, LocalIP: "127.0.0.1",
		Member:   discovery.Member{Namespace: "ns", Name: "b", UID: "uid-b", IP: "127.0.0.1", PeerPort: ln.Addr().(*net.TCPAddr).Port, Ready: true, Serving: true},
		Channels: func() []string { return []string{"orders"} }, Router: r, Log: logr.Discard(), Keepalive: time.Second})
	for _, l := range []string{"one", "two"} {
		if res, reason := link.Send(t.Context(), "orders", router.Line, buffer.Payload{Data: []byte(l)}, false, spec.Overflow); res != router.Queued {
			t.Fatalf("%s not queued: %s", l, reason)
		}
	}
	start(t.Context(), t, link)
	defer func() { _ = link.Close() }()
	conn, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if typ, _, err := ReadHandshake(conn, maxHandshakeBytes); err != nil || typ != FrameHello {
		t.Fatalf("HELLO: %d, %v", typ, err)
	}
	if _, err := conn.Write(Welcome{Version: 1, Pod: Identity{"ns", "b", "uid-b", 9}, Known: true, LastSeq: 41}.Frame()); err != nil {
		t.Fatal(err)
	}
	fr := NewReader(conn, MaxFrameBytes)
	defer fr.Close()
	for _, want := range []string{"42:one", "43:two"} {
		typ, body, err := fr.Next()
		for err == nil && typ != FrameData {
			typ, body, err = fr.Next()
		}
		if err != nil {
			t.Fatal(err)
		}
		d, _ := ParseData(body)
		if got := fmt.Sprintf("%d:%s", d.Seq, d.Payload); got != want {
			t.Fatalf("got %s, want %s", got, want)
		}
	}
}

// TestLinkRecoversPanics: a panic in a link's session is counted and ends only that
// session; the link redials and delivers.
func TestLinkRecoversPanics(t *testing.T) {
	ts := newTestServer(t, 4096)
	r := router.New(logr.Discard(), nil)
	defer r.Close()
	spec := discovery.Spec{}.WithDefaults()
	r.Ensure("orders", spec)
	m := NewMetrics(nil)
	var calls atomic.Int32
	p := ts.srv.Addr().(*net.TCPAddr).Port
	link := NewLink(LinkConfig{Self: Identity{"ns", "a", "uid-a", 77}, LocalIP: "127.0.0.1", Metrics: m,
		Member: discovery.Member{Namespace: "ns", Name: "b", UID: "uid-b", IP: "127.0.0.1", PeerPort: p, Ready: true, Serving: true},
		Channels: func() []string {
			if calls.Add(1) == 1 {
				panic("boom")
			}
			return []string{"orders"}
		}, Router: r, Log: logr.Discard(), Keepalive: time.Second})
	start(t.Context(), t, link)
	defer func() { _ = link.Close() }()
	if res, reason := link.Send(t.Context(), "orders", router.Line, buffer.Payload{Data: []byte("after")}, false, spec.Overflow); res != router.Queued {
		t.Fatalf("not queued: %s", reason)
	}
	select {
	case got := <-ts.lines:
		if got != "after" {
			t.Fatalf("delivered %q", got)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the link did not recover from the panic")
	}
	if n := testutil.ToFloat64(m.Panics.WithLabelValues("out")); n != 1 {
		t.Fatalf("panics = %v, want 1", n)
	}
}
