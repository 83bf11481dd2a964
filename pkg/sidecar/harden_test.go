package sidecar_test

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestBlockVanishedMember: under Block, a member that is listed but gone (its address
// accepts nothing, so its link never acknowledges) holds the channel back for maxBlock
// only; then the lines for it are dropped and counted block_timeout, and the other
// receivers get every line. Once the member is removed, what its link still held is
// counted peer_removed: every line for it is accounted for, exactly.
func TestBlockVanishedMember(t *testing.T) {
	c := prepareCluster(t, 3, chanCfg{name: "orders", policy: "Block", maxBlock: "1s", queueBytes: 16 << 10})
	a, b := c.pods[0], c.pods[1] // pods[2] is listed but never started
	c.start(a)
	c.start(b)
	c.waitReady(a)
	c.waitReady(b)
	eventually(t, "a's link to b", func() bool { return c.metric(a, `podipc_peer_links{direction="out",state="up"}`) == 1 })
	sender := c.dialApp(a, 0, false)
	receiver := c.dialApp(b, 0, false)
	c.waitConns(b, "orders", 1)
	eventually(t, "a to see b's connection", func() bool { return c.metric(a, `podipc_members{channel="orders",state="serving"}`) == 2 })

	const n = 20_000
	done := make(chan error, 1)
	go func() { done <- sender.write("x", 0, n) }()
	eventually(t, "b's app to get every line", func() bool { return receiver.count() >= n })
	checkSeq(t, "b's app", receiver.lines(), "x", 0, n)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	timedOut := c.metric(a, `podipc_dropped_lines_total{channel="orders",reason="block_timeout"}`)
	if timedOut == 0 || timedOut >= n {
		t.Fatalf("a counted %v lines block_timeout, want some but not all of %d", timedOut, n)
	}
	if !a.logged("held the channel back for maxBlock") {
		t.Fatal("a did not log the block_timeout drops")
	}

	c.writeConfig(c.pods[:2]) // the vanished member is finally removed
	removed := `podipc_dropped_lines_total{channel="orders",reason="peer_removed"}`
	accounted := func() float64 {
		return c.metric(a, removed) + c.metric(a, `podipc_dropped_lines_total{channel="orders",reason="block_timeout"}`)
	}
	eventually(t, "a to settle what its link to the vanished member held", func() bool { return accounted() >= n })
	if got := accounted(); got != n {
		t.Fatalf("a counted %v lines block_timeout or peer_removed for the vanished member, want exactly %d", got, n)
	}
	if got := c.metric(b, `podipc_dropped_lines_total{channel="orders",reason="block_timeout"}`); got != 0 {
		t.Fatalf("b counted %v lines block_timeout", got)
	}
}

// TestMalformedNodeIPCFrame: a node-ipc client's frames that are not node-ipc events are
// skipped, counted malformed and logged; its connection and every other frame, before
// and after, go on.
func TestMalformedNodeIPCFrame(t *testing.T) {
	c := newCluster(t, 2, chanCfg{name: "orders"})
	a, b := c.pods[0], c.pods[1]
	reader := c.dialApp(b, 0, false)
	nc := dialNodeIPC(t, a, "orders")
	c.waitConns(a, "orders", 1)
	c.waitConns(b, "orders", 1)
	eventually(t, "a to see b's connection", func() bool { return c.metric(a, `podipc_peer_links{direction="out",state="up"}`) == 1 })

	bad := []string{`{not json`, `["type","message"]`, `{"type":7}`, `{"data":"no type"}`}
	var w strings.Builder
	for i := range 10 {
		fmt.Fprintf(&w, `{"type":"message","data":"good-%d"}`+"\f", i)
		w.WriteString(bad[i%len(bad)] + "\f")
	}
	if _, err := nc.Write([]byte(w.String())); err != nil {
		t.Fatal(err)
	}
	eventually(t, "b's app to read every good frame", func() bool { return reader.count() >= 10 })
	for i, l := range reader.lines() {
		if want := fmt.Sprintf(`{"type":"message","data":"good-%d"}`, i); l != want {
			t.Fatalf("line %d = %q, want %q", i, l, want)
		}
	}
	malformed := `podipc_dropped_lines_total{channel="orders",reason="malformed"}`
	eventually(t, "a to count the malformed frames", func() bool { return c.metric(a, malformed) >= 10 })
	if got := c.metric(a, malformed); got != 10 {
		t.Fatalf("a counted %v malformed frames, want 10", got)
	}
	if !a.logged("Skipped malformed node-ipc frame") {
		t.Fatal("a did not log the malformed frame")
	}
	// The connection still carries frames both ways.
	if _, err := nc.Write([]byte(`{"type":"message","data":"after"}` + "\f")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "b's app to read the frame after", func() bool { return reader.count() >= 11 })
	reader.send(t, "back-", 0, 1)
	_ = nc.SetReadDeadline(time.Now().Add(30 * time.Second))
	got, err := bufio.NewReader(nc).ReadString('\f')
	if want := `{"type":"message","data":"back-00000000"}` + "\f"; err != nil || got != want {
		t.Fatalf("node-ipc client read %q (%v), want %q", got, err, want)
	}
}

// TestSparseLinesDoNotPinChunks: a sparse channel sharing a peer link with a busy one,
// its reader stalled, must not keep a whole 64 KiB read chunk alive per queued line: the
// queued lines may cost the receiving sidecar at most twice queueBytes of real memory.
// Each sparse line is sent between about a chunk's worth of busy lines, so that on the
// receiver every chunk holds one; before the fix 1,500 of them pinned over 90 MiB.
func TestSparseLinesDoNotPinChunks(t *testing.T) {
	const queueBytes = 1 << 20
	c := newCluster(t, 2, chanCfg{name: "busy", queueBytes: 16 << 20}, chanCfg{name: "sparse", queueBytes: queueBytes})
	a, b := c.pods[0], c.pods[1]
	busyIn, sparseIn := c.dialApp(a, 0, false), c.dialApp(a, 1, false)
	busyOut, sparseOut := c.dialApp(b, 0, false), c.dialApp(b, 1, true)
	c.waitConns(b, "busy", 1)
	c.waitConns(b, "sparse", 1)
	eventually(t, "a to see b's connections", func() bool {
		return c.metric(a, `podipc_peer_links{direction="out",state="up"}`) == 1
	})
	_ = sparseOut

	// Fill the stalled reader's socket buffers, so that its lines stay queued.
	queued := func() float64 { return c.metric(b, `podipc_queue_bytes{channel="sparse"}`) }
	for i := 0; queued() == 0; i++ {
		if err := sendPadded(sparseIn, 64); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
		if i > 10_000 {
			t.Fatal("the stalled reader's queue never filled")
		}
	}
	busyLines := 0
	// round sends one sparse line (if sparse) and a chunk's worth of busy lines, and
	// waits for the busy reader to read them, so the next round lands in another chunk.
	round := func(sparse bool, i int) {
		if sparse {
			if _, err := fmt.Fprintf(sparseIn.conn, "s%d\n", i); err != nil {
				t.Fatal(err)
			}
		}
		if err := sendPadded(busyIn, 64); err != nil { // 64 lines of 850 bytes
			t.Fatal(err)
		}
		busyLines += 64
		for busyOut.count() < busyLines {
			time.Sleep(200 * time.Microsecond)
		}
	}
	rounds := 1500
	for i := range rounds / 5 { // warm up: the same busy traffic, no sparse lines
		round(false, i)
	}
	base := rss(t, b)
	before := queued()
	for i := range rounds {
		round(true, i)
	}
	eventually(t, "b to queue every sparse line", func() bool { return queued()-before >= float64(rounds*2) })
	if d := c.metric(b, `podipc_dropped_lines_total{channel="sparse",reason="queue_full"}`); d != 0 {
		t.Fatalf("b dropped %v sparse lines: the test proved nothing", d)
	}
	grown := rss(t, b) - base
	t.Logf("b's RSS grew by %d KiB with %d sparse lines queued (queue %v bytes)", grown>>10, rounds, queued())
	// Only a large excess fails: twice the bound, plus room for the heap's own noise.
	if limit := 2*queueBytes + 16<<20; grown > limit {
		t.Fatalf("b's RSS grew by %d MiB with %d one-line chunks queued, want at most %d MiB (2 x queueBytes + 16 MiB)",
			grown>>20, rounds, limit>>20)
	}
}

// TestAppConnectionCap: an app that opens more connections than --max-app-connections
// (a leak, or a loop on connect) is refused the extra ones, on the line port and on the
// node-ipc socket, counted and logged; the connections it has keep working, and a slot
// freed is taken again.
func TestAppConnectionCap(t *testing.T) {
	const limit = 3
	c := prepareCluster(t, 2, chanCfg{name: "orders"})
	c.args = []string{fmt.Sprintf("--max-app-connections=%d", limit)}
	c.startAll()
	c.waitLinks()
	a, b := c.pods[0], c.pods[1]
	sock := filepath.Join(b.sockDir, "app.orders")
	readers := make([]*app, limit)
	for i := range readers {
		readers[i] = c.dialApp(b, 0, false)
	}
	var nodeConns []net.Conn
	for range limit {
		nc, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = nc.Close() }()
		nodeConns = append(nodeConns, nc)
	}
	c.waitConns(b, "orders", 2*limit)

	refusedOn := func(endpoint string) float64 {
		return c.metric(b, fmt.Sprintf(`podipc_app_refused_total{channel="orders",endpoint=%q,reason="connection_limit"}`, endpoint))
	}
	// An app looping on connect: every connection over the cap is refused and counted.
	const attempts = 20
	for _, ep := range []struct{ network, address, name string }{
		{"tcp", net.JoinHostPort(b.ip, "7000"), "line"},
		{"unix", sock, "nodeipc"},
	} {
		for i := range attempts {
			extra, err := net.Dial(ep.network, ep.address)
			if err != nil {
				t.Fatal(err)
			}
			_ = extra.SetReadDeadline(time.Now().Add(30 * time.Second))
			if n, err := extra.Read(make([]byte, 1)); err == nil {
				t.Fatalf("connection %d to the %s endpoint read %d bytes; want it closed", limit+1+i, ep.name, n)
			} else if errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("connection %d to the %s endpoint was not closed", limit+1+i, ep.name)
			}
			_ = extra.Close()
		}
		eventually(t, "the refused connections counted", func() bool { return refusedOn(ep.name) >= attempts })
		if got := refusedOn(ep.name); got != attempts {
			t.Fatalf("b counted %v refused %s connections, want %d", got, ep.name, attempts)
		}
	}
	if !b.logged("Refused app connections over the connection cap") {
		t.Fatal("b did not log the refused connections")
	}
	if got := c.metric(b, `podipc_local_connections{channel="orders"}`); got != 2*limit {
		t.Fatalf("b has %v app connections, want %d", got, 2*limit)
	}

	// The connections within the cap are unaffected.
	sender := c.dialApp(a, 0, false)
	c.waitConns(a, "orders", 1)
	sender.send(t, "x", 0, 100)
	for i, r := range readers {
		eventually(t, fmt.Sprintf("reader %d to get every line", i), func() bool { return r.count() >= 100 })
		checkSeq(t, fmt.Sprintf("reader %d", i), r.lines(), "x", 0, 100)
	}
	for i, nc := range nodeConns {
		_ = nc.SetReadDeadline(time.Now().Add(30 * time.Second))
		got, err := bufio.NewReader(nc).ReadString('\f')
		if want := `{"type":"message","data":"x00000000"}` + "\f"; err != nil || got != want {
			t.Fatalf("node-ipc client %d read %q (%v), want %q", i, got, err, want)
		}
	}

	// A freed slot is taken again.
	_ = readers[0].conn.Close()
	c.waitConns(b, "orders", 2*limit-1)
	again := c.dialApp(b, 0, false)
	c.waitConns(b, "orders", 2*limit)
	sender.send(t, "y", 0, 1)
	eventually(t, "the new connection to get a line", func() bool { return again.count() >= 1 })
	if got := refusedOn("line"); got != attempts {
		t.Fatalf("b counted %v refused line connections, want %d", got, attempts)
	}

	// The node-ipc socket lets every container of the pod connect (the test's directory
	// has no fsGroup), and nothing more: not executable, not a regular file.
	fi, err := os.Lstat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o666 {
		t.Fatalf("node-ipc socket mode %v, want a socket with 0666", fi.Mode())
	}
}

// TestUnframeablePeerLines: lines from a peer that a local connection's framing cannot
// carry (here, node-ipc messages that are not JSON, sent by hand by a member as
// docs/protocol.md frames them) are not delivered to that connection, counted
// unframeable and not as written, and every other line reaches every connection, which
// stays open: also when the unframeable message is the last (here: the only) one of the
// batch its writer took, which once closed the connection.
func TestUnframeablePeerLines(t *testing.T) {
	c := prepareCluster(t, 3, chanCfg{name: "orders"})
	b, m := c.pods[1], c.pods[2] // m is a member played by the test
	c.start(b)
	c.waitReady(b)
	line := c.dialApp(b, 0, false)
	nc := dialNodeIPC(t, b, "orders")
	c.waitConns(b, "orders", 2)

	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(m.ip)}}
	peerConn, err := d.Dial("tcp", net.JoinHostPort(b.ip, "7701"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = peerConn.Close() }()
	str := func(b []byte, s string) []byte { return append(binary.AppendUvarint(b, uint64(len(s))), s...) }
	frame := func(typ byte, body []byte) []byte {
		return append(binary.BigEndian.AppendUint32(nil, uint32(1+len(body))), append([]byte{typ}, body...)...)
	}
	hello := binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(nil, 1), 1)
	hello = str(str(str(hello, "demo"), m.name), m.uid)
	hello = binary.AppendUvarint(binary.BigEndian.AppendUint64(hello, 77), 1)
	hello = str(hello, "orders")
	data := func(seq uint64, kind byte, payload string) []byte {
		body := append(str(binary.AppendUvarint(nil, seq), "orders"), kind)
		return frame(4, append(body, payload...))
	}
	unframeable := `podipc_dropped_lines_total{channel="orders",reason="unframeable"}`
	// A node-ipc message neither client can carry, alone: each writer takes a batch of it
	// only.
	out := append(frame(1, hello), data(1, 1, "not json")...)
	if _, err := peerConn.Write(out); err != nil {
		t.Fatal(err)
	}
	head := make([]byte, 5)
	_ = peerConn.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.ReadFull(peerConn, head); err != nil || head[4] != 2 {
		t.Fatalf("no WELCOME from b: type %d, %v", head[4], err)
	}
	eventually(t, "b to count the lone unframeable line for both connections", func() bool { return c.metric(b, unframeable) >= 2 })
	// Then another, and an honest line behind it, in one write.
	if _, err := peerConn.Write(append(data(2, 1, "not json either"), data(3, 0, "fine")...)); err != nil {
		t.Fatal(err)
	}

	eventually(t, "the line client to read the honest line", func() bool { return line.count() >= 1 })
	_ = nc.SetReadDeadline(time.Now().Add(30 * time.Second))
	got, err := bufio.NewReader(nc).ReadString('\f')
	if want := `{"type":"message","data":"fine"}` + "\f"; err != nil || got != want {
		t.Fatalf("node-ipc client read %q (%v), want %q", got, err, want)
	}
	if got := line.lines(); len(got) != 1 || got[0] != "fine" {
		t.Fatalf("line client read %q, want only \"fine\"", got)
	}
	eventually(t, "b to count the unframeable lines for both connections", func() bool { return c.metric(b, unframeable) >= 4 })
	if got := c.metric(b, unframeable); got != 4 {
		t.Fatalf("b counted %v unframeable lines, want 4 (two per connection)", got)
	}
	if !b.logged("Dropped a message this connection cannot carry") {
		t.Fatal("b did not log the unframeable line")
	}
	if got := c.metric(b, `podipc_lines_out_total{channel="orders"}`); got != 2 {
		t.Fatalf("b counted %v lines written, want 2 (the honest line, once per connection)", got)
	}
}
