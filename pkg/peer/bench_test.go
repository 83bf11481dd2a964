package peer

import (
	"bytes"
	"context"
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
