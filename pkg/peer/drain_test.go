package peer

import (
	"bytes"
	"context"
	"errors"
	"net"
	"testing"

	"github.com/podipc/podipc/pkg/router"
)

// drainLocal plays the endpoint writer of the local connection c until ctx ends: it
// takes whatever is queued, hands each message (each line of a run) to got, and marks it written (which
// completes it, so the server acknowledges it). The returned channel is closed when it
// has stopped.
func drainLocal(ctx context.Context, c *router.Conn, got func(data []byte)) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		var items []router.Item
		for {
			select {
			case <-c.Queue.Ready():
			case <-ctx.Done():
				return
			}
			items = c.Queue.Take(items[:0])
			for _, it := range items {
				if it.Run == 0 {
					got(it.Data)
					continue
				}
				// A run of lines from a RUN frame: each line, as the app reads it.
				for _, l := range bytes.SplitAfter(it.Data, []byte{'\n'}) {
					if len(l) > 0 {
						got(l[:len(l)-1])
					}
				}
			}
			c.Written(items)
			clear(items)
		}
	}()
	return done
}

// sharesOrders is the discovery of the tests' pods: they share one channel, orders.
func sharesOrders(string) []string { return []string{"orders"} }

// start runs r's blocking Start in a goroutine, as its owner does; an error other than
// net.ErrClosed (closed before it started) fails the test.
func start(ctx context.Context, tb testing.TB, r interface{ Start(context.Context) error }) {
	tb.Helper()
	go func() {
		if err := r.Start(ctx); err != nil && !errors.Is(err, net.ErrClosed) {
			tb.Error(err)
		}
	}()
}
