package sidecar_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/podipc/podipc/pkg/peer"
	"github.com/podipc/podipc/pkg/peertls"
)

// TestMTLSReceiveOnly: on a channel where one member may only receive (published by
// discovery, as the controller publishes spec.access.receiveOnly), every line that member
// sends is dropped by each receiver, counted exactly as not_permitted and logged, while it
// still receives every line of the others, and the others' lines still reach each other.
func TestMTLSReceiveOnly(t *testing.T) {
	c := newMTLSCluster(t, 3, chanCfg{name: "orders", policy: "Block", receiveOnly: []string{"pod-c"}})
	apps := make([]*app, len(c.pods))
	for i, p := range c.pods {
		apps[i] = c.dialApp(p, 0, false)
	}
	for _, p := range c.pods {
		c.waitConns(p, "orders", 1)
	}
	n := 5_000 / scale
	for i, a := range apps {
		a.send(t, fmt.Sprintf("%c", 'a'+i), 0, n)
	}
	a, b, ro := apps[0], apps[1], apps[2]
	eventually(t, "the receive-only member receives every line of the others", func() bool { return ro.count() >= 2*n })
	eventually(t, "the senders receive each other's lines", func() bool { return a.count() >= n && b.count() >= n })
	for _, p := range c.pods[:2] {
		eventually(t, "every line of the receive-only member dropped at "+p.name, func() bool {
			return c.metric(p, `podipc_dropped_lines_total{channel="orders",reason="not_permitted"}`) >= float64(n)
		})
	}
	time.Sleep(200 * time.Millisecond)
	for i, p := range c.pods[:2] {
		if got := c.metric(p, `podipc_dropped_lines_total{channel="orders",reason="not_permitted"}`); got != float64(n) {
			t.Fatalf("%s counted %v lines not_permitted, want exactly %d", p.name, got, n)
		}
		if !p.logged(`"msg":"Dropped a peer's line: the member may only receive on this channel"`) || !p.logged(`"uid":"uid-c"`) {
			t.Fatalf("%s did not log the drop of the receive-only member's lines", p.name)
		}
		for _, l := range apps[i].lines() {
			if l[:1] == "c" {
				t.Fatalf("%s delivered %q from the receive-only member", p.name, l)
			}
		}
	}
	checkSeq(t, "pod-a from pod-b", a.lines(), "b", 0, n)
	checkSeq(t, "pod-b from pod-a", b.lines(), "a", 0, n)
	var fromA, fromB []string
	for _, l := range ro.lines() {
		switch l[:1] {
		case "a":
			fromA = append(fromA, l)
		case "b":
			fromB = append(fromB, l)
		}
	}
	checkSeq(t, "pod-c from pod-a", fromA, "a", 0, n)
	checkSeq(t, "pod-c from pod-b", fromB, "b", 0, n)
	if got := c.metric(c.pods[2], `podipc_dropped_lines_total{channel="orders",reason="not_permitted"}`); got != 0 {
		t.Fatalf("the receive-only member dropped %v lines of members that may send", got)
	}
}

// TestMTLSServiceAccountImpostor: an attacker holding a valid certificate (our root, the
// right namespace and the member's pod UID) of another service account than discovery
// publishes for that member, dialling from the member's IP with its HELLO, is refused,
// counted as service_account and logged; the member's own link streams on.
func TestMTLSServiceAccountImpostor(t *testing.T) {
	c := newMTLSCluster(t, 2, chanCfg{name: "orders", policy: "Block"})
	a, b := c.pods[0], c.pods[1]
	sender := c.dialApp(b, 0, false)
	r := c.dialApp(a, 0, false)
	c.waitConns(a, "orders", 1)
	n := 50_000 / scale
	stop := make(chan struct{})
	streamed := make(chan error, 1)
	go func() { streamed <- pacedWrite(sender, "h", n, time.Millisecond, stop) }()

	now := time.Now()
	forged := b.identity()
	forged.ServiceAccount = "intruder"
	at := attacker{from: b.ip, cert: issue(t, c.ca, forged, now.Add(-time.Hour), now.Add(time.Hour))}
	series := fmt.Sprintf(`podipc_peer_refused_total{reason=%q}`, peertls.ReasonServiceAccount)
	before := c.metric(a, series)
	reason, welcome, err := at.hello(t, a, peer.Identity{Namespace: "demo", Name: b.name, UID: b.uid, Incarnation: 42})
	if welcome {
		t.Fatal("a certificate of another service account was welcomed")
	}
	t.Logf("refused: reason %q, err %v", reason, err)
	eventually(t, "the refusal counted as service_account", func() bool { return c.metric(a, series) == before+1 })
	eventually(t, "the refusal logged", func() bool {
		return a.logged(`"msg":"Refused peer link"`) && a.logged(`certificate names service account \"intruder\"`)
	})
	close(stop)
	if err := <-streamed; err != nil {
		t.Fatal(err)
	}
	eventually(t, "every honest line", func() bool { return r.count() >= n })
	time.Sleep(100 * time.Millisecond)
	checkSeq(t, "receiver", r.lines(), "h", 0, n)
}
