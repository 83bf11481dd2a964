package peer

import (
	"context"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/router"
)

// testSender is one sending pod: its own router and an outbound link to the server.
type testSender struct {
	link    *Link
	router  *router.Router
	metrics *router.Metrics
	sent    int
}

// TestServerForgetsDepartedSenders: the resume state of a sender killed without GOODBYE
// is kept while the sender is still a member (so that it could resume exactly once),
// and freed once it leaves the membership — whether it left after its link ended or
// while the link was up. A member whose link is reset again and again while the
// membership is revalidated resumes every time: every line arrives once, in order, and
// nothing is settled as if the server had restarted. A member that left and joins
// again starts afresh, without a duplicate.
func TestServerForgetsDepartedSenders(t *testing.T) {
	defer goleak.VerifyNone(t)
	spec := discovery.Spec{Overflow: discovery.Overflow{Policy: discovery.Block, QueueBytes: 64 << 10}}.WithDefaults()
	recvRouter := router.New(logr.Discard(), nil)
	local := recvRouter.Ensure("orders", spec).Attach(router.Line, "", func() {})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	members := map[string]bool{"uid-a": true, "uid-b": true, "uid-c": true}
	metrics := NewMetrics(nil)
	srv := NewServer(ln, ServerConfig{Self: Identity{"ns", "r", "uid-r", 7}, Router: recvRouter, Log: logr.Discard(), Metrics: metrics,
		Shared: sharesOrders,
		Authorize: func(id Identity, ip string) string {
			mu.Lock()
			defer mu.Unlock()
			if !members[id.UID] || ip != "127.0.0.1" {
				return "not a member"
			}
			return ""
		}})
	leave := func(uid string) {
		mu.Lock()
		delete(members, uid)
		mu.Unlock()
		srv.Revalidate() // as the sidecar does after every membership change
	}
	senderStates := func() int { return int(testutil.ToFloat64(metrics.Senders)) }
	inboundUp := func() int { return int(testutil.ToFloat64(metrics.Links.WithLabelValues("in", "up"))) }
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	start(ctx, t, srv)

	// The receiving "app" records the lines of each sender.
	var gotMu sync.Mutex
	got := map[string][]string{}
	readerDone := drainLocal(ctx, local, func(data []byte) {
		gotMu.Lock()
		got[string(data[:1])] = append(got[string(data[:1])], string(data))
		gotMu.Unlock()
	})
	received := func(name string) []string {
		gotMu.Lock()
		defer gotMu.Unlock()
		return append([]string(nil), got[name]...)
	}

	port := ln.Addr().(*net.TCPAddr).Port
	senders := map[string]*testSender{}
	for i, name := range []string{"a", "b", "c"} {
		ts := &testSender{metrics: router.NewMetrics(prometheus.NewRegistry())}
		ts.router = router.New(logr.Discard(), ts.metrics)
		ts.router.Ensure("orders", spec)
		ts.link = NewLink(LinkConfig{Self: Identity{"ns", name, "uid-" + name, uint64(i + 1)}, LocalIP: "127.0.0.1",
			Member:   discovery.Member{Namespace: "ns", Name: "r", UID: "uid-r", IP: "127.0.0.1", PeerPort: port, Ready: true, Serving: true},
			Channels: func() []string { return []string{"orders"} }, Router: ts.router, Log: logr.Discard(), Keepalive: time.Second})
		start(ctx, t, ts.link)
		senders[name] = ts
	}
	defer func() {
		for _, ts := range senders {
			_ = ts.link.Close()
		}
		_ = srv.Close()
		cancel()
		<-readerDone
		local.Detach()
		for _, ts := range senders {
			ts.router.Close()
		}
		recvRouter.Close()
	}()
	send := func(name string, n int) error {
		ts := senders[name]
		for range n {
			line := buffer.Payload{Data: fmt.Appendf(nil, "%s%06d", name, ts.sent)}
			if res, reason := ts.link.Send(ctx, "orders", router.Line, line, false, spec.Overflow); res != router.Queued {
				return fmt.Errorf("line %d of %s not queued: %s", ts.sent, name, reason)
			}
			ts.sent++
		}
		return nil
	}
	for name := range senders {
		if err := send(name, 100); err != nil {
			t.Fatal(err)
		}
	}
	for name := range senders {
		eventuallyTrue(t, name+"'s lines", func() bool { return len(received(name)) >= 100 })
	}
	if n := senderStates(); n != 3 {
		t.Fatalf("%d sender states, want 3", n)
	}

	// a dies without GOODBYE (kill -9, node loss): its connection just ends.
	_ = senders["a"].link.Close()
	eventuallyTrue(t, "a's connection to end", func() bool { return inboundUp() == 2 })
	srv.Revalidate() // a membership change that keeps a
	if n := senderStates(); n != 3 {
		t.Fatalf("%d sender states after a disconnected while still a member, want 3: a could not resume", n)
	}
	leave("uid-a")
	if n := senderStates(); n != 2 {
		t.Fatalf("%d sender states after disconnected a left the membership, want 2", n)
	}

	// b leaves while its link is up: the link is closed, and its state freed with it.
	leave("uid-b")
	eventuallyTrue(t, "b's state to be freed", func() bool { return senderStates() == 1 && inboundUp() == 1 })

	// c stays a member: resets while the membership is revalidated all the time keep
	// its state, so it resumes exactly once, in order.
	stop := make(chan struct{})
	var revalidating sync.WaitGroup
	revalidating.Go(func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
				srv.Revalidate()
			}
		}
	})
	const n = 5000
	sendErr := make(chan error, 1)
	go func() { sendErr <- send("c", n) }()
	for i := range 10 {
		eventuallyTrue(t, "c's stream to go on", func() bool { return len(received("c")) >= 100+(i+1)*n/20 })
		senders["c"].link.Reset()
	}
	if err := <-sendErr; err != nil {
		t.Fatal(err)
	}
	eventuallyTrue(t, "all of c's lines", func() bool { return len(received("c")) >= 100+n })
	close(stop)
	revalidating.Wait()
	time.Sleep(100 * time.Millisecond) // a duplicate would show up as an extra line
	checkLines(t, received("c"), "c", 100+n)
	if d := testutil.ToFloat64(senders["c"].metrics.Dropped.WithLabelValues("orders", router.ReasonPeerRestarted)); d != 0 {
		t.Fatalf("c settled %v lines as peer_restarted: its resume state was lost", d)
	}
	if r := testutil.ToFloat64(senders["c"].link.cfg.Metrics.Reconnects); r == 0 {
		t.Fatal("c's link never reconnected: the test proved nothing")
	}
	if n := senderStates(); n != 1 {
		t.Fatalf("%d sender states, want 1 (c)", n)
	}

	// b, refused since it left, joins again with the same incarnation: it is unknown
	// now, and the lines it queued meanwhile arrive once, in order.
	if err := send("b", 50); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	members["uid-b"] = true
	mu.Unlock()
	srv.Revalidate()
	eventuallyTrue(t, "b's new lines", func() bool { return len(received("b")) >= 150 })
	time.Sleep(100 * time.Millisecond) // a duplicate would show up as an extra line
	checkLines(t, received("b"), "b", 150)
	if n := senderStates(); n != 2 {
		t.Fatalf("%d sender states at the end, want 2 (b, c)", n)
	}
}

// eventuallyTrue polls cond for up to a generous bound; never a timing assertion.
func eventuallyTrue(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// checkLines asserts that lines are exactly the first n lines of sender name, in order.
func checkLines(t *testing.T, lines []string, name string, n int) {
	t.Helper()
	if len(lines) != n {
		t.Fatalf("received %d lines of %s, want %d", len(lines), name, n)
	}
	for i, l := range lines {
		if want := fmt.Sprintf("%s%06d", name, i); l != want {
			t.Fatalf("line %d of %s = %q, want %q", i, name, l, want)
		}
	}
}
