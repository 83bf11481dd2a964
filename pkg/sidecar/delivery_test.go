package sidecar_test

import (
	"fmt"
	"testing"
)

// TestBroadcast: a line reaches every other connection in the sender's pod and every
// connection of the other members, never the sender.
func TestBroadcast(t *testing.T) {
	c := newCluster(t, 3, chanCfg{name: "orders"})
	a, b, cc := c.pods[0], c.pods[1], c.pods[2]
	sender := c.dialApp(a, 0, false)
	a2 := c.dialApp(a, 0, false)
	b1 := c.dialApp(b, 0, false)
	c1 := c.dialApp(cc, 0, false)
	c2 := c.dialApp(cc, 0, false)
	c.waitConns(a, "orders", 2)
	c.waitConns(b, "orders", 1)
	c.waitConns(cc, "orders", 2)
	const n = 1000
	sender.send(t, "m", 0, n)
	for name, r := range map[string]*app{"a2": a2, "b1": b1, "c1": c1, "c2": c2} {
		eventually(t, name+" receives every line", func() bool { return r.count() >= n })
		checkSeq(t, name, r.lines(), "m", 0, n)
	}
	if got := sender.count(); got != 0 {
		t.Fatalf("the sender received %d of its own lines", got)
	}
}

// TestAnyOne: round robin over the sender's own pod (which has another connection) and
// the remote members with a connection; every line reaches exactly one pod, and all of
// that pod's connections.
func TestAnyOne(t *testing.T) {
	c := newCluster(t, 3, chanCfg{name: "jobs", delivery: "AnyOne"})
	a, b, cc := c.pods[0], c.pods[1], c.pods[2]
	sender := c.dialApp(a, 0, false)
	a2 := c.dialApp(a, 0, false)
	b1 := c.dialApp(b, 0, false)
	b2 := c.dialApp(b, 0, false)
	c1 := c.dialApp(cc, 0, false)
	c.waitConns(b, "jobs", 2)
	c.waitConns(cc, "jobs", 1)
	c.waitConns(a, "jobs", 2)
	// Presence travels over the links: wait until the sender's sidecar has seen it by
	// probing with single lines is not needed — the links were established before the
	// connections, so the PRESENCE updates follow; give them a moment by polling the
	// receivers after the send instead.
	const n = 300
	sender.send(t, "j", 0, n)
	eventually(t, "every line delivered once", func() bool {
		return a2.count()+b1.count()+c1.count() >= n
	})
	seen := map[string]string{}
	for name, r := range map[string]*app{"a": a2, "b": b1, "c": c1} {
		if r.count() == 0 {
			t.Fatalf("pod %s received no line: not round robin", name)
		}
		for _, l := range r.lines() {
			if prev, dup := seen[l]; dup {
				t.Fatalf("line %s reached %s and %s", l, prev, name)
			}
			seen[l] = name
		}
	}
	if len(seen) != n {
		t.Fatalf("%d distinct lines delivered, want %d", len(seen), n)
	}
	eventually(t, "b2 mirrors b1", func() bool { return b2.count() == b1.count() })
	if fmt.Sprint(b1.lines()) != fmt.Sprint(b2.lines()) {
		t.Fatal("the two connections of pod b did not receive the same lines")
	}
	if sender.count() != 0 {
		t.Fatal("the sender received its own line")
	}
}

// TestOrdering: many lines from one connection arrive complete and in order.
func TestOrdering(t *testing.T) {
	c := newCluster(t, 2, chanCfg{name: "orders", policy: "Block"})
	sender := c.dialApp(c.pods[0], 0, false)
	r := c.dialApp(c.pods[1], 0, false)
	c.waitConns(c.pods[1], "orders", 1)
	n := 1_000_000 / scale
	go func() { _ = sender.write("o", 0, n) }()
	eventually(t, "all lines", func() bool { return r.count() >= n })
	checkSeq(t, "receiver", r.lines(), "o", 0, n)
	if d := c.metric(c.pods[0], `podipc_dropped_lines_total{channel="orders",reason="queue_full"}`); d != 0 {
		t.Fatalf("%v lines dropped under Block", d)
	}
}
