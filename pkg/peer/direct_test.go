package peer

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/router"
)

// TestLinkDirectWriteKeepsOrder: senders write their frames straight into the link's
// socket while the writer is idle (directLocked) and leave to the writer what a full
// socket does not take. Four senders queue lines at once while the receiving app stalls
// now and then, so that the receiver stops reading, the socket fills and direct writes
// are cut short: every line arrives, once, in each sender's order, over one session
// (no protocol error, no resume), and both a direct write and a partial one happened.
func TestLinkDirectWriteKeepsOrder(t *testing.T) {
	// The receiver's queue is small, so that a stalled app soon stops its read loop; the
	// sender's is larger than the socket buffers, so that the socket fills.
	spec := discovery.Spec{Overflow: discovery.Overflow{Policy: discovery.Block, QueueBytes: 256 << 10}}.WithDefaults()
	sendOv := discovery.Overflow{Policy: discovery.Block, QueueBytes: 64 << 20}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	recvRouter := router.New(logr.Discard(), nil)
	defer recvRouter.Close()
	local := recvRouter.Ensure("orders", spec).Attach(router.Line, "app", func() {})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	const senders, n = 4, 5000
	var mu sync.Mutex
	got := map[string][]string{}
	total := 0
	all := make(chan struct{})
	drained := drainLocal(ctx, local, func(data []byte) {
		s := string(data)
		mu.Lock()
		defer mu.Unlock()
		got[s[:1]] = append(got[s[:1]], s)
		if total++; total%1000 == 0 {
			time.Sleep(50 * time.Millisecond) // a stalled app: the receiver stops reading
		}
		if total == senders*n {
			close(all)
		}
	})
	srv := NewServer(ln, ServerConfig{Self: Identity{"ns", "b", "uid-b", 2}, Router: recvRouter, Log: logr.Discard(),
		Authorize: func(Identity, string) string { return "" }, Shared: sharesOrders})
	start(ctx, t, srv)
	defer func() { _ = srv.Close() }()

	sendRouter := router.New(logr.Discard(), nil)
	defer sendRouter.Close()
	link := NewLink(LinkConfig{Self: Identity{"ns", "a", "uid-a", 1}, LocalIP: "127.0.0.1",
		Member:   discovery.Member{Namespace: "ns", Name: "b", UID: "uid-b", IP: "127.0.0.1", PeerPort: ln.Addr().(*net.TCPAddr).Port},
		Channels: func() []string { return []string{"orders"} }, Router: sendRouter, Log: logr.Discard(), Keepalive: time.Second})
	start(ctx, t, link)
	defer func() { _ = link.Close() }()
	eventuallyTrue(t, "link up", func() bool { _, up := link.Presence("orders"); return up })

	pad := strings.Repeat("x", 2000)
	var wg sync.WaitGroup
	for s := range senders {
		name := string(rune('a' + s))
		wg.Go(func() {
			for i := range n {
				line := fmt.Appendf(nil, "%s%06d%s", name, i, pad)
				if res, reason := link.Send(ctx, "orders", router.Line, buffer.Payload{Data: line}, false, sendOv); res != router.Queued {
					t.Errorf("line %d of %s not queued: %s", i, name, reason)
					return
				}
			}
		})
	}
	wg.Wait()
	select {
	case <-all:
	case <-time.After(60 * time.Second):
		mu.Lock()
		t.Fatalf("received %d of %d lines", total, senders*n)
	}
	mu.Lock()
	for s := range senders {
		name := string(rune('a' + s))
		lines := got[name]
		for i := range lines {
			lines[i] = strings.TrimSuffix(lines[i], pad)
		}
		checkLines(t, lines, name, n)
	}
	mu.Unlock()
	link.mu.Lock()
	directs, partials := link.directs, link.partials
	link.mu.Unlock()
	t.Logf("direct writes %d, of which partial %d", directs, partials)
	// Resuming would hide frames written out of turn: the one session must have lasted.
	if r := testutil.ToFloat64(link.cfg.Metrics.Reconnects); r != 0 {
		t.Fatalf("the link reconnected %v times: a frame was written out of turn", r)
	}
	if directs == 0 || partials == 0 {
		t.Fatalf("direct writes %d, partial %d: the test did not exercise both paths", directs, partials)
	}
	cancel()
	<-drained
}
