package peer

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/router"
)

// TestLinkMetricsPerPeer checks the per-peer series podipc status reads: the link to pod
// b is reported down until it connects, up while connected, down again (with a later
// change time) when b goes away, with the bytes queued meanwhile as unacknowledged, and
// its series disappear when the link is closed.
func TestLinkMetricsPerPeer(t *testing.T) {
	defer goleak.VerifyNone(t)
	spec := discovery.Spec{Overflow: discovery.Overflow{Policy: discovery.Block, QueueBytes: 64 << 10}}.WithDefaults()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	recvRouter := router.New(logr.Discard(), nil)
	recvRouter.Ensure("orders", spec)
	srv := NewServer(ln, ServerConfig{Self: Identity{"ns", "b", "uid-b", 2}, Router: recvRouter, Log: logr.Discard(),
		Authorize: func(Identity, string) string { return "" }, Shared: sharesOrders})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	start(ctx, t, srv)

	reg := prometheus.NewRegistry()
	sendRouter := router.New(logr.Discard(), nil)
	sendRouter.Ensure("orders", spec)
	link := NewLink(LinkConfig{Self: Identity{"ns", "a", "uid-a", 1}, LocalIP: "127.0.0.1", Metrics: NewMetrics(reg),
		Member:   discovery.Member{Namespace: "ns", Name: "b", UID: "uid-b", IP: "127.0.0.1", PeerPort: ln.Addr().(*net.TCPAddr).Port},
		Channels: func() []string { return []string{"orders"} }, Router: sendRouter, Log: logr.Discard(), Keepalive: 200 * time.Millisecond})
	if up, _ := peerGauge(t, reg, "podipc_peer_link_up", "b"); up != 0 {
		t.Fatalf("a link not yet started reports up=%v", up)
	}
	created, _ := peerGauge(t, reg, "podipc_peer_link_last_change_timestamp_seconds", "b")
	start(ctx, t, link)
	eventuallyTrue(t, "link reported up", func() bool { v, _ := peerGauge(t, reg, "podipc_peer_link_up", "b"); return v == 1 })

	_ = srv.Close()
	eventuallyTrue(t, "link reported down", func() bool { v, _ := peerGauge(t, reg, "podipc_peer_link_up", "b"); return v == 0 })
	if changed, _ := peerGauge(t, reg, "podipc_peer_link_last_change_timestamp_seconds", "b"); changed < created {
		t.Fatalf("last change %v earlier than creation %v", changed, created)
	}
	for range 3 {
		if res, reason := link.Send(ctx, "orders", router.Line, buffer.Payload{Data: []byte("0123456789")}, false, spec.Overflow); res != router.Queued {
			t.Fatalf("not queued: %s", reason)
		}
	}
	if v, _ := peerGauge(t, reg, "podipc_peer_link_unacked_bytes", "b"); v != 30 {
		t.Fatalf("unacked bytes to b = %v, want 30 (three 10-byte lines queued while the link is down)", v)
	}

	_ = link.Close()
	for _, name := range []string{"podipc_peer_link_up", "podipc_peer_link_last_change_timestamp_seconds", "podipc_peer_link_unacked_bytes"} {
		if _, ok := peerGauge(t, reg, name, "b"); ok {
			t.Fatalf("%s{peer=\"b\"} still exported after the link closed", name)
		}
	}
	cancel()
	sendRouter.Close()
	recvRouter.Close()
}

// peerGauge returns the value of the gauge name{peer=peer} in reg, and whether it exists.
func peerGauge(t *testing.T, reg *prometheus.Registry, name, peer string) (float64, bool) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetName() == "peer" && lp.GetValue() == peer {
					return m.GetGauge().GetValue(), true
				}
			}
		}
	}
	return 0, false
}
