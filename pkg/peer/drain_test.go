package peer

import (
	"context"

	"github.com/podipc/podipc/pkg/router"
)

// drainLocal plays the endpoint writer of the local connection c until ctx ends: it
// takes whatever is queued, hands each message to got, and marks it written (which
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
				got(it.Data)
			}
			c.Written(items)
			clear(items)
		}
	}()
	return done
}

// sharesOrders is the discovery of the tests' pods: they share one channel, orders.
func sharesOrders(string) []string { return []string{"orders"} }
