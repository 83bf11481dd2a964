package sidecar_test

import (
	"testing"
	"time"
)

// TestMembershipChangeLive: removing a member closes only its links (the others keep
// delivering), and adding it back restores delivery, without restarting a sidecar.
func TestMembershipChangeLive(t *testing.T) {
	c := newCluster(t, 3, chanCfg{name: "orders"})
	a, b, cc := c.pods[0], c.pods[1], c.pods[2]
	sender := c.dialApp(a, 0, false)
	rb := c.dialApp(b, 0, false)
	c.waitConns(b, "orders", 1)
	before := c.metric(a, "podipc_peer_reconnects_total")
	c.writeConfig([]*pod{a, b})
	up := `podipc_peer_links{direction="out",state="up"}`
	eventually(t, "a drops its link to c", func() bool { return c.metric(a, up) == 1 })
	if got := c.metric(a, "podipc_peer_reconnects_total"); got != before {
		t.Fatalf("the link to b was disturbed: %v reconnects", got-before)
	}
	sender.send(t, "x", 0, 10)
	eventually(t, "b still receives", func() bool { return rb.count() >= 10 })
	c.writeConfig(c.pods)
	eventually(t, "a links to c again", func() bool { return c.metric(a, up) == 2 })
	rc := c.dialApp(cc, 0, false)
	c.waitConns(cc, "orders", 1)
	eventually(t, "c reachable", func() bool {
		sender.send(t, "y", 0, 1)
		return rc.count() > 0
	})
	checkSeq(t, "b", rb.lines()[:10], "x", 0, 10)
}

// TestKilledMemberForgotten: a member killed without GOODBYE (kill -9, node loss) keeps
// its resume state at the other sidecars while it is still listed, since it could come
// back and resume, and loses it once it leaves the membership; the members that stay
// still get every line exactly once, in order, across link resets.
func TestKilledMemberForgotten(t *testing.T) {
	c := newCluster(t, 3, chanCfg{name: "orders", policy: "Block"})
	a, b, cc := c.pods[0], c.pods[1], c.pods[2]
	const states = "podipc_peer_senders"
	for _, p := range []*pod{a, b} {
		eventually(t, "2 sender states at "+p.name, func() bool { return c.metric(p, states) == 2 })
	}
	doomed := c.dialApp(cc, 0, false)
	ra := c.dialApp(a, 0, false)
	c.waitConns(a, "orders", 1)
	doomed.send(t, "k", 0, 100)
	eventually(t, "a receives c's lines", func() bool { return ra.count() >= 100 })

	c.kill(cc)
	inUp := `podipc_peer_links{direction="in",state="up"}`
	for _, p := range []*pod{a, b} {
		eventually(t, "c's link into "+p.name+" to end", func() bool { return c.metric(p, inUp) == 1 })
		if got := c.metric(p, states); got != 2 {
			t.Fatalf("%s keeps %v sender states while c is still listed, want 2", p.name, got)
		}
	}
	c.writeConfig([]*pod{a, b})
	for _, p := range []*pod{a, b} {
		eventually(t, p.name+" to forget c", func() bool { return c.metric(p, states) == 1 })
	}

	sender := c.dialApp(b, 0, false)
	c.waitConns(b, "orders", 1)
	n := 50_000 / scale
	done := make(chan error, 1)
	go func() { done <- sender.write("s", 0, n) }()
	for i := 0; ra.count() < 100+n && i < 10; i++ {
		c.post(b, "/debug/reset-peers")
		time.Sleep(30 * time.Millisecond)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	eventually(t, "b's lines at a", func() bool { return ra.count() >= 100+n })
	time.Sleep(200 * time.Millisecond) // a duplicate would show up as an extra line
	checkSeq(t, "a", ra.lines()[:100], "k", 0, 100)
	checkSeq(t, "a", ra.lines()[100:], "s", 0, n)
}
