package sidecar_test

import (
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"
)

// TestLinePortTakenAtStart: a channel's line port held by another process when the
// sidecar starts (say, a previous process of the pod still shutting down) is bound once
// it is released, without a new discovery snapshot (the static file never changes), and
// the sidecar is not ready until then.
func TestLinePortTakenAtStart(t *testing.T) {
	c := prepareCluster(t, 2, chanCfg{name: "orders"})
	a, b := c.pods[0], c.pods[1]
	squatter, err := net.Listen("tcp", net.JoinHostPort(a.ip, "7000"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = squatter.Close() }()
	config, err := os.ReadFile(c.config)
	if err != nil {
		t.Fatal(err)
	}
	c.start(a)
	c.start(b)
	c.waitReady(b)
	c.waitLinks() // a has synced: it links to b and b to it

	unbound := `podipc_endpoint_unbound{channel="orders",endpoint="line"}`
	eventually(t, "a to report its line port unbound", func() bool { return c.metric(a, unbound) == 1 })
	eventually(t, "a to retry the bind", func() bool { return a.logged("Still cannot bind channel endpoint") })
	if code := c.readyz(a); code != http.StatusServiceUnavailable {
		t.Fatalf("a's /readyz answers %d while its line port is taken, want 503", code)
	}
	if got := c.metric(a, `podipc_endpoint_unbound{channel="orders",endpoint="nodeipc"}`); got != 0 {
		t.Fatalf("a reports its node-ipc socket unbound (%v)", got)
	}

	_ = squatter.Close()
	c.waitReady(a)
	if got := c.metric(a, unbound); got != 0 {
		t.Fatalf("a is ready but reports its line port unbound (%v)", got)
	}
	ra := c.dialApp(a, 0, false)
	rb := c.dialApp(b, 0, false)
	c.waitConns(a, "orders", 1)
	c.waitConns(b, "orders", 1)
	ra.send(t, "a", 0, 10)
	rb.send(t, "b", 0, 10)
	eventually(t, "lines both ways", func() bool { return ra.count() >= 10 && rb.count() >= 10 })
	checkSeq(t, "a's app", ra.lines(), "b", 0, 10)
	checkSeq(t, "b's app", rb.lines(), "a", 0, 10)
	if !a.logged("Bound channel endpoint after retrying") {
		t.Fatal("a did not log that it bound its line port after retrying")
	}
	if now, err := os.ReadFile(c.config); err != nil || string(now) != string(config) {
		t.Fatalf("the static file changed (%v): the test proved nothing", err)
	}
}

// TestUnboundChannelDeleted: a channel whose line port cannot be bound keeps the
// sidecar not ready only while it is served; once the channel is deleted its retries
// stop and the sidecar is ready, serving the channels that remain.
func TestUnboundChannelDeleted(t *testing.T) {
	c := prepareCluster(t, 1, chanCfg{name: "orders"}, chanCfg{name: "events"})
	a := c.pods[0]
	squatter, err := net.Listen("tcp", net.JoinHostPort(a.ip, "7001")) // events' line port
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = squatter.Close() }()
	c.start(a)
	unbound := `podipc_endpoint_unbound{channel="events",endpoint="line"}`
	eventually(t, "a to report events' line port unbound", func() bool { return c.metric(a, unbound) == 1 })
	eventually(t, "a to retry the bind", func() bool { return a.logged("Still cannot bind channel endpoint") })
	if code := c.readyz(a); code != http.StatusServiceUnavailable {
		t.Fatalf("a's /readyz answers %d while events' line port is taken, want 503", code)
	}

	c.channels = c.channels[:1] // events is deleted; orders keeps port 7000
	c.writeConfig(c.pods)
	c.waitReady(a)
	if got := c.metric(a, unbound); got != 0 {
		t.Fatalf("a still reports events' line port unbound (%v)", got)
	}
	retries := func() int {
		a.logMu.Lock()
		defer a.logMu.Unlock()
		return strings.Count(a.log.String(), "Still cannot bind channel endpoint")
	}
	before := retries()
	time.Sleep(3 * time.Second) // longer than the backoff reached so far
	if after := retries(); after != before {
		t.Fatalf("a retried the bind of a deleted channel %d more times", after-before)
	}
	c.dialApp(a, 0, false) // orders is still served
	c.waitConns(a, "orders", 1)
}
