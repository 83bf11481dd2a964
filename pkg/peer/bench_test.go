package peer

import (
	"bytes"
	"context"
	"strconv"
	"testing"

	"github.com/go-logr/logr"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/router"
)

func sizeName(n int) string {
	if n == 64 {
		return "64B"
	}
	return "1KiB"
}

// BenchmarkReaderData decodes a stream of DATA frames as the receiving sidecar's read
// loop does.
func BenchmarkReaderData(b *testing.B) {
	for _, size := range []int{64, 1024} {
		b.Run(sizeName(size), func(b *testing.B) {
			payload := make([]byte, size)
			var stream []byte
			for i := range 1024 {
				stream = AppendDataHeader(stream, uint64(i+1), "bench", router.Line, size)
				stream = append(stream, payload...)
			}
			src := bytes.NewReader(stream)
			r := NewReader(src, MaxFrameBytes)
			b.SetBytes(int64(size))
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				if i%1024 == 0 {
					src.Reset(stream)
				}
				_, body, err := r.Next()
				if err != nil {
					b.Fatal(err)
				}
				if _, err := ParseData(body); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkLinkSend queues lines on a link and acknowledges them in batches, as the
// sending sidecar does for every line bound to a remote pod.
func BenchmarkLinkSend(b *testing.B) {
	for _, size := range []int{64, 1024} {
		b.Run(sizeName(size), func(b *testing.B) {
			r := router.New(logr.Discard(), nil)
			defer r.Close()
			l := NewLink(LinkConfig{Router: r, Log: logr.Discard(), Member: discovery.Member{UID: "b"}})
			data := make([]byte, size)
			ov := discovery.Overflow{Policy: discovery.Block, QueueBytes: 1 << 30}
			ctx := context.Background()
			b.SetBytes(int64(size))
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				if res, _ := l.Send(ctx, "bench", router.Line, buffer.Payload{Data: data}, false, ov); res != router.Queued {
					b.Fatal("not queued")
				}
				if i%256 == 255 {
					l.mu.Lock()
					l.outbox.ack(uint64(i + 1))
					l.mu.Unlock()
				}
			}
		})
	}
}

// BenchmarkBroadcastFanout routes Broadcast lines from one local app to N member links
// whose sessions are encoding (as if up), in batches of 64 as the endpoint reads them;
// after each batch every link's writer takes what was encoded and the receiver
// acknowledges it. No socket is written, so what it measures is the sending sidecar's
// per-line, per-link work: queueing, encoding, acknowledging. Compare N with
// instruction counts (callgrind), not ns/op:
//
//	go test -c -o /tmp/peer.test ./pkg/peer/
//	valgrind --tool=callgrind /tmp/peer.test -test.run='^$' -test.bench='^BenchmarkBroadcastFanout/N=16$' -test.benchtime=20000x
func BenchmarkBroadcastFanout(b *testing.B) {
	for _, n := range []int{1, 4, 16, 64} {
		b.Run("N="+strconv.Itoa(n), func(b *testing.B) { benchFanout(b, n, 64) })
	}
}

func benchFanout(b *testing.B, members, size int) {
	r := router.New(logr.Discard(), nil)
	defer r.Close()
	ch := r.Ensure("bench", discovery.Spec{Overflow: discovery.Overflow{Policy: discovery.Block, QueueBytes: 1 << 30}})
	links := make([]*Link, members)
	remotes := make([]router.Remote, members)
	ready := make([]bool, members)
	for i := range links {
		links[i] = NewLink(LinkConfig{Router: r, Log: logr.Discard(), Member: discovery.Member{UID: "m" + strconv.Itoa(i), Name: "m" + strconv.Itoa(i)}})
		links[i].mu.Lock()
		links[i].outbox.startEncoding(true)
		links[i].mu.Unlock()
		remotes[i], ready[i] = links[i], true
	}
	ch.SetMembers(remotes, ready, ready)
	from := ch.Attach(router.Line, "", func() {})
	line := make([]byte, size)
	var slab buffer.Slab
	defer slab.Close()
	batch := make([]buffer.Payload, 0, 64)
	spares := make([][]byte, members)
	ctx := context.Background()
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		batch = append(batch, slab.CopyLine(line, '\n'))
		if len(batch) < cap(batch) && i < b.N-1 {
			continue
		}
		ch.RouteBatch(ctx, from, router.Line, batch)
		slab.Recycle()
		batch = batch[:0]
		for j, l := range links {
			l.mu.Lock()
			buf, _ := l.outbox.take(spares[j])
			l.outbox.ack(l.outbox.sentSeq)
			l.mu.Unlock()
			spares[j] = buf
		}
	}
	b.StopTimer()
	for _, l := range links {
		_ = l.Close()
	}
}
