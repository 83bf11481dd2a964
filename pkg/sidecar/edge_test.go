package sidecar_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/podipc/podipc/pkg/peer"
)

// TestOversizedLine: a line over maxMessageBytes ends that app connection only.
func TestOversizedLine(t *testing.T) {
	c := newCluster(t, 2, chanCfg{name: "orders", maxMessageBytes: 1024})
	a, b := c.pods[0], c.pods[1]
	bad := c.dialApp(a, 0, false)
	good := c.dialApp(a, 0, false)
	r := c.dialApp(b, 0, false)
	c.waitConns(b, "orders", 1)
	c.waitConns(a, "orders", 2)
	if _, err := bad.conn.Write([]byte(strings.Repeat("x", 4096) + "\n")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-bad.done:
	case <-time.After(30 * time.Second):
		t.Fatal("the connection that sent an oversized line was not closed")
	}
	good.send(t, "g", 0, 10)
	eventually(t, "the other connection still works", func() bool { return r.count() >= 10 })
	checkSeq(t, "receiver", r.lines(), "g", 0, 10)
	if got := good.count(); got != 0 {
		t.Fatalf("the other local connection received %d lines of its own", got)
	}
	c.waitConns(a, "orders", 1)
	a.logMu.Lock()
	logged := strings.Contains(a.log.String(), "longer than maxMessageBytes")
	a.logMu.Unlock()
	if !logged {
		t.Fatal("no clear log of the oversized line")
	}
}

// TestLineAndNodeIPC: a line app and a node-ipc app on one channel; only the receiving
// edge translates.
func TestLineAndNodeIPC(t *testing.T) {
	c := newCluster(t, 2, chanCfg{name: "orders"})
	a, b := c.pods[0], c.pods[1]
	line := c.dialApp(a, 0, false)
	nc := dialNodeIPC(t, b, "orders")
	c.waitConns(b, "orders", 1)
	c.waitConns(a, "orders", 1)
	line.send(t, "hello-", 0, 1)
	br := bufio.NewReader(nc)
	_ = nc.SetReadDeadline(time.Now().Add(30 * time.Second))
	got, err := br.ReadString('\f')
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"type":"message","data":"hello-00000000"}` + "\f"; got != want {
		t.Fatalf("node-ipc client read %q, want %q", got, want)
	}
	if _, err := nc.Write([]byte("{ \"type\": \"order\",\n \"data\": {\"id\": 7} }\f")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "line client reads the node-ipc message", func() bool { return line.count() >= 1 })
	if got, want := line.lines()[0], `{"type":"order","data":{"id":7}}`; got != want {
		t.Fatalf("line client read %q, want %q", got, want)
	}
}

// TestImpostorPeer: a peer link from a pod that is not a member, or that claims a
// member's identity from another IP, is refused with a reason.
func TestImpostorPeer(t *testing.T) {
	c := newCluster(t, 2, chanCfg{name: "orders"})
	a, b := c.pods[0], c.pods[1]
	// The real peer's first link may have been refused while a's discovery was still
	// syncing (counted under the same reason): count only this test's refusals.
	refused := func() float64 { return c.metric(a, `podipc_peer_refused_total{reason="unauthorized"}`) }
	before := refused()
	cases := map[string]struct {
		from string
		id   peer.Identity
	}{
		"not a member":             {from: b.ip, id: peer.Identity{Namespace: "demo", Name: "pod-z", UID: "uid-z", Incarnation: 1}},
		"member's UID, wrong IP":   {from: strings.TrimSuffix(b.ip, ".2") + ".9", id: peer.Identity{Namespace: "demo", Name: b.name, UID: b.uid, Incarnation: 1}},
		"member's UID, wrong name": {from: b.ip, id: peer.Identity{Namespace: "demo", Name: "pod-x", UID: b.uid, Incarnation: 1}},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(tc.from)}, Timeout: 5 * time.Second}
			conn, err := d.Dial("tcp", net.JoinHostPort(a.ip, "7701"))
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = conn.Close() }()
			_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
			h := peer.Hello{MinVersion: peer.MinVersion, MaxVersion: peer.Version, Pod: tc.id, Channels: []string{"orders"}}
			if _, err := conn.Write(h.Frame()); err != nil {
				t.Fatal(err)
			}
			typ, body, err := peer.NewReader(conn, 1<<16).Next()
			if err != nil {
				t.Fatal(err)
			}
			if typ != peer.FrameRefuse {
				t.Fatalf("got frame type %d, want REFUSE", typ)
			}
			reason, _ := peer.ParseReason(body)
			t.Logf("refused: %s", reason)
			if _, err := io.ReadAll(conn); err != nil {
				t.Fatalf("connection not closed after REFUSE: %v", err)
			}
		})
	}
	if got := refused() - before; got != float64(len(cases)) {
		t.Fatalf("refused %v links, want %d", got, len(cases))
	}
}

// TestManyConnections: 1,000 local connections each receive a line, and the
// sidecar's file descriptors and goroutines return to their baseline when they close,
// and again after its peer links were reset.
func TestManyConnections(t *testing.T) {
	c := newCluster(t, 2, chanCfg{name: "orders"})
	a, b := c.pods[0], c.pods[1]
	c.waitLinks()
	baseline := fds(t, b)
	goroutines := func(p *pod) float64 { return c.metric(p, "go_goroutines") }
	baseA, baseB := goroutines(a), goroutines(b)
	if baseA <= 0 || baseB <= 0 {
		t.Fatalf("go_goroutines not exported: %v, %v", baseA, baseB)
	}
	const n = 1000
	conns := make([]net.Conn, n)
	for i := range conns {
		conn, err := net.Dial("tcp", net.JoinHostPort(b.ip, "7000"))
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = conn
	}
	c.waitConns(b, "orders", n)
	sender := c.dialApp(a, 0, false)
	sender.send(t, "x", 0, 1)
	for i, conn := range conns {
		_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
		got, err := bufio.NewReader(conn).ReadString('\n')
		if err != nil || got != "x00000000\n" {
			t.Fatalf("connection %d read %q, %v", i, got, err)
		}
		_ = conn.Close()
	}
	c.waitConns(b, "orders", 0)
	eventually(t, fmt.Sprintf("fds back to %d", baseline), func() bool { return fds(t, b) <= baseline })
	eventually(t, fmt.Sprintf("goroutines of b back to %v", baseB), func() bool { return goroutines(b) <= baseB })

	// Reset every peer link mid-traffic: the new sessions replace the old ones' goroutines.
	for i := range 5 {
		sender.send(t, "y", i*100, i*100+100)
		c.post(a, "/debug/reset-peers")
		c.post(b, "/debug/reset-peers")
	}
	sender.send(t, "z", 0, 1)
	_ = sender.conn.Close()
	c.waitConns(a, "orders", 0)
	c.waitLinks()
	for _, p := range []struct {
		pod  *pod
		base float64
	}{{a, baseA}, {b, baseB}} {
		eventually(t, fmt.Sprintf("goroutines of %s back to %v", p.pod.name, p.base), func() bool { return goroutines(p.pod) <= p.base })
	}
	eventually(t, fmt.Sprintf("fds back to %d after link resets", baseline), func() bool { return fds(t, b) <= baseline })
}

// TestSigtermDrain: on SIGTERM the sidecar stops being ready, flushes what its apps
// sent to the peers, says goodbye, and exits 0.
func TestSigtermDrain(t *testing.T) {
	c := newCluster(t, 2, chanCfg{name: "orders", policy: "Block"})
	a, b := c.pods[0], c.pods[1]
	sender := c.dialApp(a, 0, false)
	r := c.dialApp(b, 0, false)
	c.waitConns(b, "orders", 1)
	c.waitConns(a, "orders", 1)
	n := 50_000 / scale
	sender.send(t, "d", 0, n)
	eventually(t, "the sidecar to accept every line", func() bool {
		return c.metric(a, `podipc_lines_in_total{channel="orders"}`) >= float64(n)
	})
	if err := c.terminate(a); err != nil {
		t.Fatalf("sidecar exited with %v, want status 0", err)
	}
	eventually(t, "every line delivered", func() bool { return r.count() >= n })
	checkSeq(t, "receiver", r.lines(), "d", 0, n)
	select {
	case <-sender.done:
	case <-time.After(30 * time.Second):
		t.Fatal("the app connection did not end when its sidecar exited")
	}
	a.logMu.Lock()
	defer a.logMu.Unlock()
	if !strings.Contains(a.log.String(), `"msg":"Drained"`) {
		t.Fatal("no drain logged")
	}
}
