package peer

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"go.uber.org/goleak"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/router"
)

// TestLinkResumesExactlyOnce runs a link and a server in process, resets the TCP
// connection repeatedly mid-stream, and checks that the receiving connection gets every
// line once, in order (guarantee (a)); then that everything shuts down without leaking
// a goroutine.
func TestLinkResumesExactlyOnce(t *testing.T) {
	defer goleak.VerifyNone(t)
	spec := discovery.Spec{Overflow: discovery.Overflow{Policy: discovery.Block, QueueBytes: 64 << 10}}.WithDefaults()

	recvRouter := router.New(logr.Discard(), nil)
	recvCh := recvRouter.Ensure("orders", spec)
	local := recvCh.Attach(router.Line, "", func() {})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(ln, ServerConfig{Self: Identity{"ns", "b", "uid-b", 2}, Router: recvRouter, Log: logr.Discard(),
		Shared: sharesOrders,
		Authorize: func(id Identity, ip string) string {
			if id.UID != "uid-a" || ip != "127.0.0.1" {
				return "not a member"
			}
			return ""
		}})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	start(ctx, t, srv)

	sendRouter := router.New(logr.Discard(), nil)
	sendRouter.Ensure("orders", spec)
	port := ln.Addr().(*net.TCPAddr).Port
	link := NewLink(LinkConfig{Self: Identity{"ns", "a", "uid-a", 1}, LocalIP: "127.0.0.1",
		Member:   discovery.Member{Namespace: "ns", Name: "b", UID: "uid-b", IP: "127.0.0.1", PeerPort: port, Ready: true, Serving: true},
		Channels: func() []string { return []string{"orders"} }, Router: sendRouter, Log: logr.Discard(), Keepalive: time.Second})
	start(ctx, t, link)

	// The receiving "app": drain the local queue as an endpoint writer would.
	const n = 20000
	got := make(chan string, n+100)
	readerDone := drainLocal(ctx, local, func(data []byte) { got <- string(data) })

	sendDone := make(chan struct{})
	go func() {
		defer close(sendDone)
		for i := range n {
			if res, reason := link.Send(ctx, "orders", router.Line, buffer.Payload{Data: fmt.Appendf(nil, "m%06d", i)}, false, spec.Overflow); res != router.Queued {
				t.Errorf("line %d not queued: %s", i, reason)
				return
			}
		}
	}()
	for i := range n {
		if i%2000 == 1000 {
			link.Reset()
		}
		select {
		case l := <-got:
			if want := fmt.Sprintf("m%06d", i); l != want {
				t.Fatalf("line %d = %q, want %q", i, l, want)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("line %d never arrived", i)
		}
	}
	<-sendDone
	select {
	case l := <-got:
		t.Fatalf("extra line %q: duplicated", l)
	case <-time.After(100 * time.Millisecond):
	}

	drainCtx, drainCancel := context.WithTimeout(t.Context(), 10*time.Second)
	if err := link.Shutdown(drainCtx); err != nil {
		t.Errorf("lines left unacknowledged at shutdown: %v", err)
	}
	drainCancel()
	_ = srv.Close()
	cancel()
	<-readerDone
	local.Detach()
	sendRouter.Close()
	recvRouter.Close()
}
