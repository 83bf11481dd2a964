package endpoint

import (
	"bufio"
	"fmt"
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
	app := dial(t, listenLines(t, ch))
	waitAttached(t, r, "orders", 1)
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
	read := func(first, n int) {
		_ = app.SetReadDeadline(time.Now().Add(10 * time.Second))
		for i := 0; i < n; {
			line, err := in.ReadString('\n')
			if err != nil {
				t.Fatalf("line %d of %d: %v (the writer closed the app's connection)", i, n, err)
			}
			if want := fmt.Sprintf("%08d ", first+i); !strings.HasPrefix(line, want) {
				t.Fatalf("line %d of %d: got %.20q, want it to start %q", i, n, line, want)
			}
			i++
		}
	}
	// A first batch sets the writer's deadline; the next comes after it has passed.
	deliver(0, 1)
	read(0, 1)
	time.Sleep(3 * writeTimeout)
	deliver(2, 256) // 256 KiB: four times the ipc.Writer's buffer, written as one batch
	read(2, 256)
}
