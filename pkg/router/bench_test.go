package router

import (
	"context"
	"testing"

	"github.com/go-logr/logr"

	"github.com/podipc/podipc/pkg/discovery"
)

// nullRemote accepts every line, like a peer link with an endless window.
type nullRemote struct{}

func (nullRemote) ID() string { return "null" }
func (nullRemote) Send(context.Context, string, Kind, []byte, bool, discovery.Overflow) (Result, string) {
	return Queued, ""
}
func (nullRemote) Presence(string) (int, bool) { return 1, true }

// drain empties q as a connection's writer does, without a socket.
func drain(c *Conn, items []Item) []Item {
	items = c.Queue.Take(items[:0])
	c.Written(items)
	clear(items)
	return items
}

func benchLines(b *testing.B, size int, route func(ch *Channel, from, to *Conn, data []byte)) {
	r := New(logr.Discard(), nil)
	defer r.Close()
	ch := r.Ensure("bench", discovery.Spec{})
	ch.SetMembers([]Remote{nullRemote{}}, []bool{true}, []bool{true})
	from := ch.Attach(Line, func() {})
	to := ch.Attach(Line, func() {})
	line := make([]byte, size)
	var slab Slab
	var items []Item
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		route(ch, from, to, slab.Copy(line))
		if i%256 == 255 {
			items = drain(to, items)
		}
	}
	drain(to, items)
}

// BenchmarkRoute is the sending sidecar's hot path: a line read from a local app is
// copied into a slab and queued for another local connection and one remote.
func BenchmarkRoute(b *testing.B) {
	for _, size := range []int{64, 1024} {
		b.Run(itoa(size), func(b *testing.B) {
			benchLines(b, size, func(ch *Channel, from, _ *Conn, data []byte) {
				ch.Route(context.Background(), from, Line, data)
			})
		})
	}
}

// BenchmarkDeliver is the receiving sidecar's hot path: a line from a peer is queued for
// the local connections, with one completion.
func BenchmarkDeliver(b *testing.B) {
	notify := make(chan struct{}, 1)
	for _, size := range []int{64, 1024} {
		b.Run(itoa(size), func(b *testing.B) {
			benchLines(b, size, func(ch *Channel, _, _ *Conn, data []byte) {
				c := NewCompletion(notify)
				ch.r.Deliver(context.Background(), "bench", Line, data, c)
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
