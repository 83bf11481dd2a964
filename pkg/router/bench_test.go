package router

import (
	"context"
	"testing"

	"github.com/go-logr/logr"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/discovery"
)

// nullRemote accepts every line, like a peer link with an endless window.
type nullRemote struct{}

func (nullRemote) ID() string { return "null" }
func (nullRemote) Send(context.Context, string, Kind, buffer.Payload, bool, discovery.Overflow) (Result, string) {
	return Queued, ""
}
func (nullRemote) SendBatch(_ context.Context, _ string, _ Kind, data []buffer.Payload, _ discovery.Overflow) (int, Result, string) {
	return len(data), Queued, ""
}
func (nullRemote) Presence(string) (int, bool) { return 1, true }

// drain empties q as a connection's writer does, without a socket.
func drain(c *Conn, items []Item) []Item {
	items = c.Queue.Take(items[:0])
	c.Written(items)
	clear(items)
	return items
}

// benchLines routes b.N lines of size bytes in batches of 64, as a reader that found
// 64 lines in its buffer does.
func benchLines(b *testing.B, size int, route func(ch *Channel, from, to *Conn, batch []buffer.Payload)) {
	r := New(logr.Discard(), nil)
	defer r.Close()
	ch := r.Ensure("bench", discovery.Spec{})
	ch.SetMembers([]Remote{nullRemote{}}, []bool{true}, []bool{true})
	from := ch.Attach(Line, "", func() {})
	to := ch.Attach(Line, "", func() {})
	line := make([]byte, size)
	var slab buffer.Slab
	var items []Item
	batch := make([]buffer.Payload, 0, 64)
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		batch = append(batch, slab.Copy(line))
		if len(batch) == cap(batch) || i == b.N-1 {
			route(ch, from, to, batch)
			slab.Recycle()
			batch = batch[:0]
			items = drain(to, items)
			items = drain(from, items) // Deliver queues for every connection
		}
	}
}

// BenchmarkRoute is the sending sidecar's hot path: a line read from a local app is
// copied into a slab and queued for another local connection and one remote.
func BenchmarkRoute(b *testing.B) {
	for _, size := range []int{64, 1024} {
		b.Run(itoa(size), func(b *testing.B) {
			benchLines(b, size, func(ch *Channel, from, _ *Conn, batch []buffer.Payload) {
				ch.RouteBatch(context.Background(), from, Line, batch)
			})
		})
	}
}

// BenchmarkDeliver is the receiving sidecar's hot path: a line from a peer is queued for
// the local connections, with one completion per batch.
func BenchmarkDeliver(b *testing.B) {
	notify := make(chan struct{}, 1)
	for _, size := range []int{64, 1024} {
		b.Run(itoa(size), func(b *testing.B) {
			benchLines(b, size, func(ch *Channel, _, _ *Conn, batch []buffer.Payload) {
				c := NewCompletion(notify)
				ch.r.DeliverBatch(context.Background(), "bench", Line, batch, c)
				c.Done()
			})
		})
	}
}

func itoa(n int) string {
	if n == 64 {
		return "64B"
	}
	return "1KiB"
}
