package sidecar_test

import (
	"bufio"
	"io"
	"strings"
	"testing"
	"time"
)

// overflowCluster has a sender on pod a, and on pod b a fast reader and a reader that
// stops reading. Lines are long so that the stalled reader's kernel buffers fill fast.
//
// maxWait is generous: the fast reader is this test process, which on a loaded machine
// under -race can pause for tens of milliseconds while its socket is full. With a short
// maxWait the policy rightly judges it slow too (Disconnect kicks it, WaitThenDrop drops
// for it), which is not what these tests are about.
func overflowCluster(t *testing.T, policy string) (c *cluster, sender, fast, slow *app, n int) {
	c = newCluster(t, 2, chanCfg{name: "orders", policy: policy, maxWait: overflowMaxWait, queueBytes: 64 << 10})
	sender = c.dialApp(c.pods[0], 0, false)
	fast = c.dialApp(c.pods[1], 0, false)
	slow = c.dialApp(c.pods[1], 0, true)
	c.waitConns(c.pods[1], "orders", 2)
	// Registered after the cluster's cleanups, so it runs while the sidecars still answer.
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		t.Logf("fast reader %s got %d lines, slow reader %s got %d", fast.conn.LocalAddr(), fast.count(),
			slow.conn.LocalAddr(), slow.count())
		for _, p := range c.pods {
			for _, r := range []string{"queue_full", "slow_consumer", "receiver_closed", "no_connection"} {
				t.Logf("%s dropped %s: %v", p.name, r, c.metric(p, `podipc_dropped_lines_total{channel="orders",reason="`+r+`"}`))
			}
		}
	})
	return c, sender, fast, slow, 40_000
}

// overflowMaxWait is the channel's maxWait in the overflow tests.
const overflowMaxWait = "2s"

const pad = "................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................"

// sendPadded writes n long lines "p<seq><pad>".
func sendPadded(a *app, n int) error {
	w := bufio.NewWriterSize(a.conn, 64<<10)
	for i := range n {
		if _, err := w.WriteString("p" + itoa8(i) + pad + "\n"); err != nil {
			return err
		}
	}
	return w.Flush()
}

func itoa8(i int) string {
	s := "00000000" + strings.TrimSpace(strings.Repeat(" ", 0)) + itoa(i)
	return s[len(s)-8:]
}

func itoa(i int) string {
	if i == 0 {
		return "0"
	}
	var b []byte
	for ; i > 0; i /= 10 {
		b = append([]byte{byte('0' + i%10)}, b...)
	}
	return string(b)
}

func stripPad(lines []string) []string {
	for i, l := range lines {
		lines[i] = strings.TrimSuffix(l, pad)
	}
	return lines
}

// TestOverflowWaitThenDrop: the stalled reader loses lines (counted queue_full), the
// fast reader and the sender are not affected, and what the stalled reader finally
// reads plus the drops is every line.
func TestOverflowWaitThenDrop(t *testing.T) {
	c, sender, fast, slow, n := overflowCluster(t, "WaitThenDrop")
	if err := sendPadded(sender, n); err != nil {
		t.Fatal(err)
	}
	eventually(t, "fast reader gets everything", func() bool { return fast.count() >= n })
	checkSeq(t, "fast reader", stripPad(fast.lines()), "p", 0, n)
	drops := "podipc_dropped_lines_total{channel=\"orders\",reason=\"queue_full\"}"
	if d := c.metric(c.pods[1], drops); d == 0 {
		t.Fatal("the stalled reader lost nothing: the test proved nothing")
	}
	if d := c.metric(c.pods[0], drops); d != 0 {
		t.Fatalf("the sending sidecar dropped %v lines: a slow remote reader hurt every reader", d)
	}
	slow.read()
	eventually(t, "stalled reader's lines plus drops are every line", func() bool {
		return slow.count()+int(c.metric(c.pods[1], drops)) >= n
	})
	time.Sleep(100 * time.Millisecond)
	if got := slow.count() + int(c.metric(c.pods[1], drops)); got != n {
		t.Fatalf("stalled reader %d + dropped = %d, want %d", slow.count(), got, n)
	}
	last := -1
	for _, l := range stripPad(slow.lines()) {
		s := seqOf(t, l, "p")
		if s <= last {
			t.Fatalf("stalled reader: %d after %d", s, last)
		}
		last = s
	}
}

// TestOverflowBlock: nothing is lost; the stalled reader holds the channel back until
// it reads again.
func TestOverflowBlock(t *testing.T) {
	c, sender, fast, slow, n := overflowCluster(t, "Block")
	done := make(chan error, 1)
	go func() { done <- sendPadded(sender, n) }()
	// While the slow reader is stalled the channel cannot complete.
	eventually(t, "the stalled reader's queue to fill", func() bool {
		return c.metric(c.pods[1], `podipc_queue_bytes{channel="orders"}`) >= 32<<10
	})
	if fast.count() >= n {
		t.Fatal("the fast reader got every line although a Block receiver was stalled")
	}
	slow.read()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	eventually(t, "both readers get everything", func() bool { return fast.count() >= n && slow.count() >= n })
	checkSeq(t, "fast reader", stripPad(fast.lines()), "p", 0, n)
	checkSeq(t, "slow reader", stripPad(slow.lines()), "p", 0, n)
}

// TestOverflowDisconnect: the stalled reader is disconnected (slow consumer); the fast
// reader gets every line.
func TestOverflowDisconnect(t *testing.T) {
	c, sender, fast, slow, n := overflowCluster(t, "Disconnect")
	if err := sendPadded(sender, n); err != nil {
		t.Fatal(err)
	}
	eventually(t, "fast reader gets everything", func() bool { return fast.count() >= n })
	checkSeq(t, "fast reader", stripPad(fast.lines()), "p", 0, n)
	if d := c.metric(c.pods[1], `podipc_dropped_lines_total{channel="orders",reason="slow_consumer"}`); d == 0 {
		t.Fatal("no slow_consumer drop counted")
	}
	_ = slow.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.Copy(io.Discard, slow.conn); err != nil {
		t.Fatalf("the slow reader's connection was not closed: %v", err)
	}
	c.waitConns(c.pods[1], "orders", 1)
}

// TestOverflowStalledReaderDoesNotStallLink: under WaitThenDrop a stalled reader's
// overflow wait happens in its own queue, not in the receiving sidecar's peer read
// loop, so the pod's other connections keep receiving every line from the same peer
// while the stalled reader waits. maxWait is long (10s): the fast reader (on another
// channel over the same link) gets every line while the stalled reader's overflow
// episode is still open, which a read loop waiting for the stalled reader would hold
// back until the episode ended.
func TestOverflowStalledReaderDoesNotStallLink(t *testing.T) {
	c := newCluster(t, 2,
		chanCfg{name: "orders", policy: "WaitThenDrop", maxWait: "10s", queueBytes: 64 << 10},
		chanCfg{name: "events", policy: "WaitThenDrop", maxWait: "10s", queueBytes: 64 << 10})
	ordersOut := c.dialApp(c.pods[0], 0, false)
	eventsOut := c.dialApp(c.pods[0], 1, false)
	slow := c.dialApp(c.pods[1], 0, true)
	fast := c.dialApp(c.pods[1], 1, false)
	c.waitConns(c.pods[1], "orders", 1)
	c.waitConns(c.pods[1], "events", 1)
	for _, p := range c.pods {
		eventually(t, "presence of "+p.name+"'s peer", func() bool {
			return c.metric(p, `podipc_peer_links{direction="out",state="up"}`) == 1
		})
	}
	ordersQueued := func() float64 { return c.metric(c.pods[1], `podipc_queue_bytes{channel="orders"}`) }
	drops := func(p *pod, ch string) float64 {
		return c.metric(p, `podipc_dropped_lines_total{channel="`+ch+`",reason="queue_full"}`)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("orders queued at pod-b %v; queue_full drops: pod-a orders %v events %v, pod-b orders %v events %v",
				ordersQueued(), drops(c.pods[0], "orders"), drops(c.pods[0], "events"),
				drops(c.pods[1], "orders"), drops(c.pods[1], "events"))
		}
	})

	// Flood orders until the stalled reader's kernel buffers and queue are full and
	// lines wait for it beyond its queue bound: its overflow episode has begun.
	const n = 20_000
	sent := make(chan error, 1)
	go func() { sent <- sendPadded(ordersOut, n) }()
	eventually(t, "the stalled reader's overflow episode to begin", func() bool {
		return ordersQueued() > 72<<10
	})
	// During the episode, every events line reaches the fast reader over the same link.
	const m = 2000
	eventsOut.send(t, "e", 0, m)
	eventually(t, "fast reader gets every events line", func() bool { return fast.count() >= m })
	if q := ordersQueued(); q <= 72<<10 {
		t.Fatalf("the stalled reader's episode ended (%v bytes queued) before the fast reader had every line: "+
			"the stalled reader held up the link", q)
	}
	checkSeq(t, "fast reader", fast.lines(), "e", 0, m)

	// The episode ends; every orders line reaches the stalled reader or is counted
	// at the receiver, in order, and the sender dropped nothing.
	slow.read()
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	eventually(t, "stalled reader's lines plus drops are every line", func() bool {
		return slow.count()+int(drops(c.pods[1], "orders")) == n
	})
	last := -1
	for _, l := range stripPad(slow.lines()) {
		s := seqOf(t, l, "p")
		if s <= last {
			t.Fatalf("stalled reader: %d after %d", s, last)
		}
		last = s
	}
	if d := drops(c.pods[0], "orders") + drops(c.pods[0], "events"); d != 0 {
		t.Fatalf("the sending sidecar dropped %v lines", d)
	}
}
