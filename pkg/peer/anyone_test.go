package peer

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/router"
)

// TestAnyOneLineToAPodWithoutAppIsRerouted is the window docs/reliability.md found on
// the real node: a pod's app has closed its connection, the sender has not yet heard
// the PRESENCE that says so, and routes AnyOne lines to it; then the pod shuts down.
// Over real sockets: the receiver holds the lines unacknowledged, says GOODBYE on
// shutdown, and the sender reroutes them to its other candidate (here a local
// connection) — every line delivered, none counted, none lost.
func TestAnyOneLineToAPodWithoutAppIsRerouted(t *testing.T) {
	spec := discovery.Spec{Delivery: discovery.AnyOne, Overflow: discovery.Overflow{MaxWait: time.Minute}}.WithDefaults()
	recvMetrics := router.NewMetrics(nil)
	recvRouter := router.New(logr.Discard(), recvMetrics)
	recvRouter.Ensure("orders", spec) // no app connection
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	peerMetrics := NewMetrics(nil)
	srv := NewServer(ln, ServerConfig{Self: Identity{"ns", "b", "uid-b", 2}, Router: recvRouter, Log: logr.Discard(),
		Metrics: peerMetrics, Shared: sharesOrders, Authorize: func(Identity, string) string { return "" }})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	start(ctx, t, srv)

	sendRouter := router.New(logr.Discard(), nil)
	other := sendRouter.Ensure("orders", spec).Attach(router.Line, "other", func() {})
	got := make(chan string, 100)
	otherDone := drainLocal(ctx, other, func(data []byte) { got <- string(data) })
	port := ln.Addr().(*net.TCPAddr).Port
	linkMetrics := NewMetrics(nil)
	link := NewLink(LinkConfig{Self: Identity{"ns", "a", "uid-a", 1}, LocalIP: "127.0.0.1",
		Member:   discovery.Member{Namespace: "ns", Name: "b", UID: "uid-b", IP: "127.0.0.1", PeerPort: port, Ready: true, Serving: true},
		Channels: func() []string { return []string{"orders"} }, Router: sendRouter, Log: logr.Discard(), Keepalive: time.Second,
		Metrics: linkMetrics})
	start(ctx, t, link)

	const n = 5
	for i := range n {
		if res, reason := link.Send(ctx, "orders", router.Line, buffer.Payload{Data: fmt.Appendf(nil, "m%d", i)}, true, spec.Overflow); res != router.Queued {
			t.Fatalf("line %d not queued: %s", i, reason)
		}
	}
	eventuallyTrue(t, "the receiver to have the lines", func() bool {
		return testutil.ToFloat64(peerMetrics.Received) == n
	})
	time.Sleep(100 * time.Millisecond) // an acknowledgement would have arrived by now
	// Five lines of two bytes.
	if left := testutil.ToFloat64(linkMetrics.LinkUnacked.WithLabelValues("b")); left != 2*n {
		t.Fatalf("%v of %d bytes unacknowledged: a line that reached no app was acknowledged, so nobody reroutes it", left, 2*n)
	}

	sctx, scancel := context.WithTimeout(t.Context(), 5*time.Second)
	_ = srv.Shutdown(sctx) // GOODBYE
	scancel()
	seen := map[string]bool{}
	for range n {
		select {
		case l := <-got:
			seen[l] = true
		case <-time.After(10 * time.Second):
			t.Fatalf("rerouted %d of %d lines after the receiver's GOODBYE: %v", len(seen), n, seen)
		}
	}
	if c := testutil.ToFloat64(recvMetrics.Dropped.WithLabelValues("orders", router.ReasonNoConnection)); c != 0 {
		t.Errorf("the receiver counted %v lines no_connection that were rerouted", c)
	}

	_ = link.Close()
	cancel()
	<-otherDone
	other.Detach()
	sendRouter.Close()
	recvRouter.Close()
}
