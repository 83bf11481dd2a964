package sidecar_test

import (
	"testing"
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
	eventually(t, "a to settle what its link to the vanished member held", func() bool { return c.metric(a, removed) > 0 })
	if got := c.metric(a, removed) + c.metric(a, `podipc_dropped_lines_total{channel="orders",reason="block_timeout"}`); got != n {
		t.Fatalf("a counted %v lines block_timeout or peer_removed for the vanished member, want exactly %d", got, n)
	}
	if got := c.metric(b, `podipc_dropped_lines_total{channel="orders",reason="block_timeout"}`); got != 0 {
		t.Fatalf("b counted %v lines block_timeout", got)
	}
}
