package sidecar_test

import "testing"

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
