package endpoint

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/ipc"
	"github.com/podipc/podipc/pkg/router"
)

// TestRunsReachEveryKindOfApp: lines a peer sent as one RUN frame reach a line app
// exactly as line-by-line delivery would write them (an empty line included), and a
// node-ipc app as one event per line; each line is counted once per connection, and
// the batch completes (the peer link may acknowledge it) once both have written it.
func TestRunsReachEveryKindOfApp(t *testing.T) {
	m := router.NewMetrics(nil)
	r := router.New(logr.Discard(), m)
	t.Cleanup(r.Close)
	ch := r.Ensure("orders", discovery.Spec{})
	lineApp := dial(t, listenLines(t, ch))
	nodeipc, err := ListenNodeIPC(ch, filepath.Join(t.TempDir(), "app.orders"), Options{}, logr.Discard())
	if err != nil {
		t.Fatal(err)
	}
	serve(t, nodeipc)
	nodeApp := dial(t, nodeipc)
	waitAttached(t, r, "orders", 2)

	// As the peer server hands them over: a run of four lines in the read chunk, then a
	// line of a DATA frame.
	chunk := buffer.NewChunk()
	run := append(chunk.Bytes()[:0], "a\nb\n\nc\n"...)
	notify := make(chan struct{}, 1)
	done := router.NewCompletion(notify)
	r.DeliverBatch(t.Context(), "orders", router.Line,
		[]buffer.Payload{{Data: run, Ref: chunk, Run: 4}, {Data: []byte("d")}}, done)
	chunk.Release(1)
	done.Done() // the caller's own reference

	want := []string{"a", "b", "", "c", "d"}
	_ = lineApp.SetReadDeadline(time.Now().Add(10 * time.Second))
	lr := ipc.NewReader(lineApp, ipc.Lines, 1<<10)
	for _, w := range want {
		got, err := lr.Next()
		if err != nil || string(got) != w {
			t.Fatalf("line app read %q, %v; want %q", got, err, w)
		}
	}
	_ = nodeApp.SetReadDeadline(time.Now().Add(10 * time.Second))
	nr := ipc.NewReader(nodeApp, ipc.NodeIPC, 1<<10)
	for _, w := range want {
		msg, err := nr.Next()
		if err != nil {
			t.Fatal(err)
		}
		ev, err := ipc.DecodeEvent(msg)
		if err != nil || ev.Type != "message" || string(ev.Data) != `"`+w+`"` {
			t.Fatalf("node-ipc app read %s (%v); want the event of %q", msg, err, w)
		}
	}
	select {
	case <-notify:
	case <-time.After(10 * time.Second):
		t.Fatal("the batch never completed")
	}
	if got := testutil.ToFloat64(m.LinesOut.WithLabelValues("orders")); got != 10 {
		t.Fatalf("lines out %v, want 10 (five to each app)", got)
	}
}
