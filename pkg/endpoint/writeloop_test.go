package endpoint

import (
	"bufio"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/router"
)

// TestWriterAfterAnIdleMinute: the writer's deadline runs from the batch it writes, not
// from the one before: a batch larger than the write buffer, written after the
// connection was idle for longer than writeTimeout, reaches the app whole. (The deadline
// was once set only before the final flush, so such a batch's first bytes, written while
// it was encoded, met the previous batch's deadline and the app lost its connection.)
func TestWriterAfterAnIdleMinute(t *testing.T) {
	defer func(d time.Duration) { writeTimeout = d }(writeTimeout)
	writeTimeout = 100 * time.Millisecond

	r := router.New(logr.Discard(), nil)
	t.Cleanup(r.Close)
	ch := r.Ensure("orders", discovery.Spec{Overflow: discovery.Overflow{Policy: discovery.Block, QueueBytes: 64 << 20}})
	ep, err := ListenLines(ch, "127.0.0.1:0", Options{}, logr.Discard())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ep.Close() })
	go func() { _ = ep.Start(t.Context()) }()
	app, err := net.Dial("tcp", ep.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = app.Close() })
	in := bufio.NewReader(app)

	deliver := func(first, n int) {
		lines := make([]buffer.Payload, n)
		for i := range lines {
			s := fmt.Sprintf("%08d ", first+i)
			lines[i] = buffer.Payload{Data: []byte(s + strings.Repeat("x", 1023-len(s)))}
		}
		done := router.NewCompletion(make(chan struct{}, 1))
		r.DeliverBatch(t.Context(), "orders", router.Line, lines, done)
		done.Done()
	}
	const probe = "00000000 "
	read := func(first, n int) {
		_ = app.SetReadDeadline(time.Now().Add(10 * time.Second))
		for i := 0; i < n; {
			line, err := in.ReadString('\n')
			if err != nil {
				t.Fatalf("line %d of %d: %v (the writer closed the app's connection)", i, n, err)
			}
			if strings.HasPrefix(line, probe) {
				continue // a late probe (below)
			}
			if want := fmt.Sprintf("%08d ", first+i); !strings.HasPrefix(line, want) {
				t.Fatalf("line %d of %d: got %.20q, want it to start %q", i, n, line, want)
			}
			i++
		}
	}
	// The first line read back is the batch that sets the deadline. Lines delivered
	// before the connection is attached are dropped (no_connection), so probes (line 0)
	// are delivered until one arrives.
	for {
		deliver(0, 1)
		_ = app.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if _, err := in.ReadString('\n'); err == nil {
			break
		}
	}
	time.Sleep(3 * writeTimeout)
	deliver(2, 256) // 256 KiB: four times the ipc.Writer's buffer, written as one batch
	read(2, 256)
}
