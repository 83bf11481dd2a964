package sidecar_test

// Attacks on the peer port (7701) of real sidecar processes. The attacker plays a pod
// that discovery lists as a member but that runs no sidecar, so it passes admission
// (its identity and source IP are a member's) and then breaks the protocol with
// frames built by hand from docs/protocol.md, as an attacker would, not with the
// sidecar's own encoder. Each test checks that the sidecar survives, refuses and
// counts the attack with its reason, and keeps serving its honest peers with nothing
// lost.

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Frame types of docs/protocol.md.
const (
	frameHello    = 1
	frameWelcome  = 2
	frameRefuse   = 3
	frameData     = 4
	frameAck      = 5
	framePresence = 6
)

// frameOf is `uint32 length (of type byte + body) | uint8 type | body`.
func frameOf(typ byte, body []byte) []byte {
	f := binary.BigEndian.AppendUint32(nil, uint32(len(body)+1))
	f = append(f, typ)
	return append(f, body...)
}

// appendStr is a protocol string: uvarint length + bytes.
func appendStr(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendIdentity(b []byte, p *pod, incarnation uint64) []byte {
	b = appendStr(b, "demo")
	b = appendStr(b, p.name)
	b = appendStr(b, p.uid)
	return binary.BigEndian.AppendUint64(b, incarnation)
}

// helloFrame is HELLO: u16 minVersion, u16 maxVersion, identity, uvarint n, n names.
func helloFrame(p *pod, incarnation uint64, channels ...string) []byte {
	b := binary.BigEndian.AppendUint16(nil, 1)
	b = binary.BigEndian.AppendUint16(b, 1)
	b = appendIdentity(b, p, incarnation)
	b = binary.AppendUvarint(b, uint64(len(channels)))
	for _, c := range channels {
		b = appendStr(b, c)
	}
	return frameOf(frameHello, b)
}

// welcomeFrame is WELCOME: u16 version, identity, u8 known, u64 lastSeq, presence.
func welcomeFrame(p *pod, incarnation uint64, known bool, lastSeq uint64, presence map[string]uint64) []byte {
	b := binary.BigEndian.AppendUint16(nil, 1)
	b = appendIdentity(b, p, incarnation)
	k := byte(0)
	if known {
		k = 1
	}
	b = append(b, k)
	b = binary.BigEndian.AppendUint64(b, lastSeq)
	b = binary.AppendUvarint(b, uint64(len(presence)))
	for name, n := range presence {
		b = appendStr(b, name)
		b = binary.AppendUvarint(b, n)
	}
	return frameOf(frameWelcome, b)
}

// dataFrame is DATA: uvarint seq, channel string, u8 kind, payload.
func dataFrame(seq uint64, channel string, kind byte, payload string) []byte {
	b := binary.AppendUvarint(nil, seq)
	b = appendStr(b, channel)
	b = append(b, kind)
	return frameOf(frameData, append(b, payload...))
}

func ackFrame(seq uint64) []byte { return frameOf(frameAck, binary.AppendUvarint(nil, seq)) }

// wire reads frames by hand.
type wire struct {
	t    *testing.T
	conn net.Conn
	br   *bufio.Reader
}

func newWire(t *testing.T, conn net.Conn) *wire {
	_ = conn.SetDeadline(time.Now().Add(60 * time.Second))
	return &wire{t: t, conn: conn, br: bufio.NewReaderSize(conn, 1<<20)}
}

func (w *wire) write(frames ...[]byte) {
	w.t.Helper()
	for _, f := range frames {
		if _, err := w.conn.Write(f); err != nil {
			w.t.Fatalf("write: %v", err)
		}
	}
}

// next returns the next frame's type and body.
func (w *wire) next() (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(w.br, hdr[:]); err != nil {
		return 0, nil, err
	}
	body := make([]byte, binary.BigEndian.Uint32(hdr[:4])-1)
	if _, err := io.ReadFull(w.br, body); err != nil {
		return 0, nil, err
	}
	return hdr[4], body, nil
}

// untilAck reads frames until an ACK of at least seq.
func (w *wire) untilAck(seq uint64) {
	w.t.Helper()
	for {
		typ, body, err := w.next()
		if err != nil {
			w.t.Fatalf("waiting for ACK %d: %v", seq, err)
		}
		if typ == frameAck {
			if got, _ := binary.Uvarint(body); got >= seq {
				return
			}
		}
	}
}

// closedByPeer reads until the sidecar ends the connection, and fails if it does not.
func (w *wire) closedByPeer() {
	w.t.Helper()
	for {
		if _, _, err := w.next(); err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				w.t.Fatal("the sidecar did not close the connection")
			}
			return
		}
	}
}

// readPresence decodes `uvarint n, n × (channel string, uvarint connections)`.
func readPresence(b []byte) map[string]uint64 {
	p := map[string]uint64{}
	n, k := binary.Uvarint(b)
	b = b[k:]
	for range n {
		l, k := binary.Uvarint(b)
		name := string(b[k : k+int(l)])
		b = b[k+int(l):]
		c, k := binary.Uvarint(b)
		b = b[k:]
		p[name] = c
	}
	return p
}

// skipIdentity returns b after a WELCOME's version and identity.
func skipIdentity(b []byte) []byte {
	b = b[2:]
	for range 3 {
		l, k := binary.Uvarint(b)
		b = b[k+int(l):]
	}
	return b[8:]
}

// dialFrom opens a TCP connection to victim's peer port from ip.
func dialFrom(t *testing.T, ip string, victim *pod) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 10 * time.Second}
	conn, err := d.Dial("tcp", net.JoinHostPort(victim.ip, "7701"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// join plays member as at victim: it completes the handshake as a fresh incarnation
// and returns the connection and the presence WELCOME advertised.
func join(t *testing.T, as, victim *pod) (*wire, map[string]uint64) {
	t.Helper()
	w := newWire(t, dialFrom(t, as.ip, victim))
	w.write(helloFrame(as, rand.Uint64()|1, "public"))
	typ, body, err := w.next()
	if err != nil || typ != frameWelcome {
		t.Fatalf("handshake: frame type %d, %v; want WELCOME", typ, err)
	}
	body = skipIdentity(body)
	return w, readPresence(body[1+8:])
}

// attackCluster runs sidecars a and b; pod c is a member with no sidecar, the
// attacker's identity. Channel public has all three; secret only a and b.
func attackCluster(t *testing.T, public chanCfg) (c *cluster, a, b, m *pod) {
	t.Helper()
	public.name = "public"
	c = prepareCluster(t, 3, public, chanCfg{name: "secret", members: []string{"pod-a", "pod-b"}})
	a, b, m = c.pods[0], c.pods[1], c.pods[2]
	c.start(a)
	c.start(b)
	c.waitReady(a)
	c.waitReady(b)
	for _, p := range []*pod{a, b} {
		eventually(t, "the link between a and b", func() bool {
			return c.metric(p, `podipc_peer_links{direction="out",state="up"}`) == 1
		})
	}
	return c, a, b, m
}

// honest checks that b's lines on channel ch (0 public, 1 secret) still reach a, all
// of them, in order.
func (c *cluster) honest(a, b *pod, ch int, prefix string) {
	c.t.Helper()
	r := c.dialApp(a, ch, false)
	s := c.dialApp(b, ch, false)
	name := []string{"public", "secret"}[ch]
	c.waitConns(a, name, 1)
	c.waitConns(b, name, 1) // Broadcast sends to a whatever its presence
	const n = 1000
	s.send(c.t, prefix, 0, n)
	eventually(c.t, "honest lines delivered", func() bool { return r.count() >= n })
	checkSeq(c.t, "a's reader", r.lines(), prefix, 0, n)
	_ = r.conn.Close()
	_ = s.conn.Close()
	c.waitConns(a, name, 0)
}

// alive fails if p's process has exited.
func (p *pod) alive(t *testing.T) {
	t.Helper()
	select {
	case <-p.exited:
		t.Fatalf("%s exited: %v", p.name, p.exitErr)
	default:
	}
}

// TestAttackMalformedFrames: each malformed frame an admitted member sends ends its
// link with a logged, counted protocol error (issue 11 item 1: a channel name of one
// byte 0xff used to crash the sidecar through a Prometheus label), and the sidecar
// goes on serving its honest peer.
func TestAttackMalformedFrames(t *testing.T) {
	c, a, b, m := attackCluster(t, chanCfg{})
	cases := map[string]struct {
		frames [][]byte
		reason string
	}{
		"channel name 0xff":      {[][]byte{dataFrame(1, "\xff", 0, "boom")}, "channel_name"},
		"channel name too long":  {[][]byte{dataFrame(1, strings.Repeat("a", 64), 0, "x")}, "channel_name"},
		"channel name upper":     {[][]byte{dataFrame(1, "Public", 0, "x")}, "channel_name"},
		"unknown kind":           {[][]byte{dataFrame(1, "public", 9, "x")}, "kind"},
		"short DATA":             {[][]byte{frameOf(frameData, []byte{0x80})}, "malformed"},
		"empty frame":            {[][]byte{{0, 0, 0, 0}}, "malformed"},
		"sequence gap":           {[][]byte{dataFrame(1, "public", 0, "x"), dataFrame(5, "public", 0, "y")}, "sequence"},
		"frame over its channel": {[][]byte{binary.BigEndian.AppendUint32(nil, 16<<20)}, "frame_size"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			series := fmt.Sprintf(`podipc_peer_protocol_errors_total{direction="in",reason=%q}`, tc.reason)
			before := c.metric(a, series)
			w, _ := join(t, m, a)
			w.write(tc.frames...)
			w.closedByPeer()
			eventually(t, "the protocol error counted", func() bool { return c.metric(a, series) == before+1 })
			a.alive(t)
		})
	}
	if !a.logged(`"msg":"Closed peer link: protocol error"`) || !a.logged(`"reason":"channel_name"`) {
		t.Fatal("no log of the protocol error with its reason")
	}
	if n := c.metric(a, `podipc_peer_panics_total{direction="in"}`); n != 0 {
		t.Fatalf("%v panics recovered", n)
	}
	c.honest(a, b, 0, "p")
	c.honest(a, b, 1, "s")
}

// TestAttackCrossChannel: a member of public only can neither write to secret, which
// the victim also serves (its lines are dropped, counted not_shared, and the link goes
// on), nor learn from presence that secret exists (issue 11 item 2).
func TestAttackCrossChannel(t *testing.T) {
	c, a, b, m := attackCluster(t, chanCfg{})
	secret := c.dialApp(a, 1, false)
	public := c.dialApp(a, 0, false)
	c.waitConns(a, "secret", 1)
	c.waitConns(a, "public", 1)
	w, presence := join(t, m, a)
	if _, ok := presence["secret"]; ok || presence["public"] != 1 {
		t.Fatalf("WELCOME advertised %v to a member of public only", presence)
	}
	w.write(dataFrame(1, "secret", 0, "injected-by-attacker"), dataFrame(2, "public", 0, "hello-public"))
	w.untilAck(2)
	eventually(t, "the public line", func() bool { return public.count() == 1 })
	if got := public.lines()[0]; got != "hello-public" {
		t.Fatalf("public reader got %q", got)
	}
	if got := secret.lines(); len(got) != 0 {
		t.Fatalf("the secret reader got %q from a member of public only", got)
	}
	if n := c.metric(a, `podipc_dropped_lines_total{channel="secret",reason="not_shared"}`); n != 1 {
		t.Fatalf("not_shared drops = %v, want 1", n)
	}
	if !a.logged(`"reason":"not_shared"`) {
		t.Fatal("no log of the not_shared drop")
	}
	// A presence update is sent when a local connection opens: still only public.
	extra := c.dialApp(a, 1, false)
	for {
		typ, body, err := w.next()
		if err != nil {
			t.Fatal(err)
		}
		if typ == framePresence {
			if p := readPresence(body); len(p) != 1 || p["public"] != 1 {
				t.Fatalf("PRESENCE advertised %v to a member of public only", p)
			}
			break
		}
	}
	_ = extra.conn.Close()
	_ = public.conn.Close()
	_ = secret.conn.Close()
	c.waitConns(a, "secret", 0)
	c.honest(a, b, 1, "s")
}

// TestAttackChannelNameCardinality: 100,000 DATA frames for random channel names do not
// grow /metrics: names the sidecar does not serve share one series (issue 11 item 3).
func TestAttackChannelNameCardinality(t *testing.T) {
	c, a, b, m := attackCluster(t, chanCfg{})
	seriesBefore, sizeBefore := metricsShape(t, c, a)
	w, _ := join(t, m, a)
	const n = 100_000
	bw := bufio.NewWriterSize(w.conn, 256<<10)
	for i := range uint64(n) {
		_, _ = bw.Write(dataFrame(i+1, fmt.Sprintf("x%016x", rand.Uint64()), 0, "x"))
	}
	if err := bw.Flush(); err != nil {
		t.Fatal(err)
	}
	w.untilAck(n)
	if got := c.metric(a, `podipc_dropped_lines_total{channel="_other",reason="not_shared"}`); got != n {
		t.Fatalf("lines counted under _other = %v, want %d", got, n)
	}
	series, size := metricsShape(t, c, a)
	t.Logf("/metrics: %d series, %d bytes before; %d series, %d bytes after", seriesBefore, sizeBefore, series, size)
	if series > seriesBefore+10 || size > sizeBefore+4<<10 {
		t.Fatalf("/metrics grew from %d series (%d bytes) to %d (%d bytes)", seriesBefore, sizeBefore, series, size)
	}
	a.alive(t)
	c.honest(a, b, 0, "p")
}

// metricsShape returns the number of series and the size of p's /metrics.
func metricsShape(t *testing.T, c *cluster, p *pod) (series, size int) {
	t.Helper()
	resp, err := http.Get(c.url(p, "/metrics"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(body), "\n") {
		if l != "" && !strings.HasPrefix(l, "#") {
			series++
		}
	}
	return series, len(body)
}

// rss returns the resident set size of p's process, in bytes.
func rss(t *testing.T, p *pod) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// raiseFileLimit lets this process (and the sidecars it starts after) hold n sockets.
func raiseFileLimit(t *testing.T, n uint64) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Max < n {
		t.Skipf("RLIMIT_NOFILE hard limit %d is below the %d this test needs", lim.Max, n)
	}
	if lim.Cur < n {
		old := lim
		lim.Cur = n
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })
	}
}

// TestAttackIdleConnections: 15,000 connections that never send a byte, from 250
// addresses, cost the sidecar at most 16 MiB: it holds at most --peer-max-connections
// (1024) of them, at most --peer-max-connections-per-ip (8) per address, with no read
// buffer, refuses the rest at once, and ends those it holds at the handshake deadline
// (5 s), every refusal counted with its reason; its honest peer is served meanwhile
// (issue 11 item 4).
func TestAttackIdleConnections(t *testing.T) {
	const n, addrs = 15_000, 250
	raiseFileLimit(t, n+1000)
	c, a, b, _ := attackCluster(t, chanCfg{})
	refused := func(reason string) float64 {
		return c.metric(a, fmt.Sprintf(`podipc_peer_refused_total{reason=%q}`, reason))
	}
	time.Sleep(time.Second) // let the sidecar settle after start-up
	base := rss(t, a)
	prefix := a.ip[:strings.LastIndex(a.ip, ".")+1]
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, conn := range conns {
			_ = conn.Close()
		}
	}()
	for i := range n {
		ip := prefix + strconv.Itoa(5+i%addrs)
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 10 * time.Second}
		conn, err := d.Dial("tcp", net.JoinHostPort(a.ip, "7701"))
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		conns = append(conns, conn)
	}
	// Each connection is refused at once, or held until the handshake deadline (at
	// most 1024 at a time).
	eventually(t, "every connection accepted or refused", func() bool {
		return refused("connection_limit")+refused("source_limit")+refused("handshake_timeout") >= n-1024
	})
	extra := rss(t, a) - base
	// The bound is 16 MiB for each 1024 connections the sidecar held. On a loaded machine
	// dialling 15,000 takes longer than the handshake deadline, which frees slots that
	// later connections take: the sidecar then has held more than 1024 in turn (never
	// more than 1024 at once), and what the ended ones used is not all returned to the
	// OS yet. The connections refused at once must cost nothing.
	held := n - int(refused("connection_limit")+refused("source_limit"))
	t.Logf("RSS %d KiB before, +%d KiB with %d idle connections; held %d; refused: connection_limit %v, source_limit %v",
		base>>10, extra>>10, n, held, refused("connection_limit"), refused("source_limit"))
	if limit := 16 << 20 * raceMemory * max(1, (held+1023)/1024); extra > limit {
		t.Fatalf("%d idle connections (%d held) grew the sidecar's RSS by %d MiB, the bound is %d MiB", n, held, extra>>20, limit>>20)
	}
	a.alive(t)
	c.honest(a, b, 0, "p")
	eventually(t, "the held connections ended at the handshake deadline", func() bool {
		return refused("handshake_timeout") >= 1000
	})
	if !a.logged(`"reason":"connection_limit"`) || !a.logged(`"reason":"handshake_timeout"`) {
		t.Fatal("no log of the refusals")
	}
}

// TestAttackOneAddress: one address gets at most 8 connections on the peer port;
// the rest are refused at once, counted source_limit (issue 11 item 4).
func TestAttackOneAddress(t *testing.T) {
	c, a, _, m := attackCluster(t, chanCfg{})
	ip := m.ip[:strings.LastIndex(m.ip, ".")+1] + "77"
	for range 20 {
		dialFrom(t, ip, a)
	}
	eventually(t, "12 refused", func() bool {
		return c.metric(a, `podipc_peer_refused_total{reason="source_limit"}`) == 12
	})
	// A refused connection is told why and closed.
	w := newWire(t, dialFrom(t, ip, a))
	typ, body, err := w.next()
	if err != nil || typ != frameRefuse || !strings.Contains(string(body), "source_limit") {
		t.Fatalf("got frame %d %q, %v; want REFUSE naming source_limit", typ, body, err)
	}
	w.closedByPeer()
	if !a.logged(`"reason":"source_limit"`) {
		t.Fatal("no log of the refusal")
	}
}

// TestAttackFrameBounds: after the handshake a frame may be at most its channels'
// maxMessageBytes plus framing; a longer one ends the link (frame_size); a line over
// maxMessageBytes in a frame within the bound is dropped, counted too_large, and the
// link goes on (issue 11 item 6).
func TestAttackFrameBounds(t *testing.T) {
	c, a, b, m := attackCluster(t, chanCfg{maxMessageBytes: 1024})
	r := c.dialApp(a, 0, false)
	c.waitConns(a, "public", 1)
	w, _ := join(t, m, a)
	w.write(dataFrame(1, "public", 0, strings.Repeat("x", 1025)), dataFrame(2, "public", 0, "fits"))
	w.untilAck(2)
	eventually(t, "the line that fits", func() bool { return r.count() == 1 })
	if got := r.lines()[0]; got != "fits" {
		t.Fatalf("reader got %q", got)
	}
	if n := c.metric(a, `podipc_dropped_lines_total{channel="public",reason="too_large"}`); n != 1 {
		t.Fatalf("too_large drops = %v, want 1", n)
	}
	// The bound is maxMessageBytes (1024) but never below a RUN frame's 8 KiB, plus
	// 1 KiB of framing; a line of 9 KiB is over it.
	w.write(dataFrame(3, "public", 0, strings.Repeat("x", 9<<10)))
	w.closedByPeer()
	eventually(t, "frame_size counted", func() bool {
		return c.metric(a, `podipc_peer_protocol_errors_total{direction="in",reason="frame_size"}`) == 1
	})
	if !a.logged(`"reason":"too_large"`) || !a.logged(`"reason":"frame_size"`) {
		t.Fatal("no log of the drop and the protocol error")
	}
	_ = r.conn.Close()
	c.waitConns(a, "public", 0)
	c.honest(a, b, 0, "p")
}

// TestAttackFakeReceiver: a member that accepts a sidecar's link and acknowledges, or
// claims in WELCOME to have received, more than was sent is a protocol error: the link
// ends, counted and logged, and no line is settled by it — the next, honest session
// receives every line (issue 11 item 7).
func TestAttackFakeReceiver(t *testing.T) {
	c := prepareCluster(t, 2, chanCfg{name: "public"})
	a, m := c.pods[0], c.pods[1]
	ln, err := net.Listen("tcp", net.JoinHostPort(m.ip, "7701"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	c.start(a)
	c.waitReady(a)
	const inc = 0x5eed
	// accept takes a's next link, reads its HELLO and answers with welcome.
	accept := func(welcome []byte) *wire {
		t.Helper()
		conn, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = conn.Close() })
		w := newWire(t, conn)
		if typ, _, err := w.next(); err != nil || typ != frameHello {
			t.Fatalf("expected HELLO: %d, %v", typ, err)
		}
		w.write(welcome)
		return w
	}
	// data reads n DATA frames and checks they are lines from..from+n-1 in order.
	data := func(w *wire, from, n int) {
		t.Helper()
		for i := 0; i < n; {
			typ, body, err := w.next()
			if err != nil {
				t.Fatalf("after %d lines: %v", i, err)
			}
			if typ != frameData {
				continue
			}
			_, k := binary.Uvarint(body)
			l, k2 := binary.Uvarint(body[k:])
			payload := string(body[k+k2+int(l)+1:])
			if want := fmt.Sprintf("f%08d", from+i); payload != want {
				t.Fatalf("DATA %d carries %q, want %q", i, payload, want)
			}
			i++
		}
	}
	protocolErrors := func(reason string) float64 {
		return c.metric(a, fmt.Sprintf(`podipc_peer_protocol_errors_total{direction="out",reason=%q}`, reason))
	}
	presence := map[string]uint64{"public": 1}

	w := accept(welcomeFrame(m, inc, false, 0, presence))
	sender := c.dialApp(a, 0, false)
	const n = 1000
	sender.send(t, "f", 0, n)
	data(w, 0, n)
	w.write(ackFrame(1 << 62))
	w.closedByPeer()
	eventually(t, "the lying ACK counted", func() bool { return protocolErrors("ack") == 1 })

	// The same incarnation claims in WELCOME to have received far more.
	w = accept(welcomeFrame(m, inc, true, 1<<40, presence))
	w.closedByPeer()
	eventually(t, "the lying WELCOME counted", func() bool { return protocolErrors("last_seq") == 1 })

	// An honest session receives every line, none settled by the lies.
	w = accept(welcomeFrame(m, inc, true, 0, presence))
	data(w, 0, n)
	w.write(ackFrame(n))
	eventually(t, "every line acknowledged", func() bool { return c.metric(a, "podipc_peer_unacked_bytes") == 0 })
	if !a.logged(`"reason":"ack"`) || !a.logged(`"reason":"last_seq"`) {
		t.Fatal("no log of the protocol errors")
	}
	a.alive(t)
}
