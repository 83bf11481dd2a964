package router

import (
	"fmt"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/discovery"
)

func anyOneSpec(maxWait time.Duration) discovery.Spec {
	return discovery.Spec{Delivery: discovery.AnyOne, Overflow: discovery.Overflow{MaxWait: maxWait}}.WithDefaults()
}

func lines(prefix string, n int) []buffer.Payload {
	out := make([]buffer.Payload, n)
	for i := range out {
		out[i] = buffer.Payload{Data: fmt.Appendf(nil, "%s%d", prefix, i)}
	}
	return out
}

// TestAnyOneLineWithoutConnectionWaitsForOne: an AnyOne line a peer carries to a pod
// whose app has just closed its connection (the sender had not yet heard that PRESENCE)
// is neither delivered nor counted at once, and stays unacknowledged; the app's next
// connection gets it first, in order, and only then is it acknowledged.
func TestAnyOneLineWithoutConnectionWaitsForOne(t *testing.T) {
	m := NewMetrics(nil)
	r := New(logr.Discard(), m)
	defer r.Close()
	ch := r.Ensure("jobs", anyOneSpec(time.Hour))
	done := NewCompletion(make(chan struct{}, 1))
	r.DeliverBatch(t.Context(), "jobs", Line, lines("p", 3), done)
	done.Done() // the dispatcher's own reference
	if done.Complete() {
		t.Fatal("a line that found no connection was acknowledged: its sender can no longer reroute it")
	}
	if n := testutil.ToFloat64(m.Dropped.WithLabelValues("jobs", ReasonNoConnection)); n != 0 {
		t.Fatalf("counted %v no_connection while a connection may still take the lines", n)
	}
	c := ch.Attach(Line, "app", func() {})
	later := NewCompletion(make(chan struct{}, 1))
	r.DeliverBatch(t.Context(), "jobs", Line, lines("q", 1), later)
	later.Done()
	got := c.Queue.Take(nil)
	var order []string
	for _, it := range got {
		order = append(order, string(it.Data))
	}
	if fmt.Sprint(order) != "[p0 p1 p2 q0]" {
		t.Fatalf("the new connection got %v, want the parked lines first: [p0 p1 p2 q0]", order)
	}
	c.Written(got)
	if !done.Complete() {
		t.Fatal("the parked lines were written and are still unacknowledged")
	}
	c.Detach()
}

// TestAnyOneParkedLineCountedAtMaxWait: a parked line that no connection takes within
// the channel's maxWait is counted no_connection and acknowledged, as any line is at
// maxWait at the latest.
func TestAnyOneParkedLineCountedAtMaxWait(t *testing.T) {
	m := NewMetrics(nil)
	r := New(logr.Discard(), m)
	defer r.Close()
	r.Ensure("jobs", anyOneSpec(20*time.Millisecond))
	notify := make(chan struct{}, 1)
	done := NewCompletion(notify)
	r.DeliverBatch(t.Context(), "jobs", Line, lines("p", 2), done)
	done.Done()
	select {
	case <-notify:
	case <-time.After(10 * time.Second):
		t.Fatal("a parked line was never acknowledged")
	}
	if n := testutil.ToFloat64(m.Dropped.WithLabelValues("jobs", ReasonNoConnection)); n != 2 {
		t.Fatalf("no_connection = %v, want 2", n)
	}
}

// TestBroadcastLineWithoutConnectionCountedAtOnce: Broadcast has nobody else to hand a
// line to, so a line without a connection is counted no_connection and acknowledged.
func TestBroadcastLineWithoutConnectionCountedAtOnce(t *testing.T) {
	m := NewMetrics(nil)
	r := New(logr.Discard(), m)
	defer r.Close()
	r.Ensure("news", discovery.Spec{Overflow: discovery.Overflow{MaxWait: time.Hour}}.WithDefaults())
	done := NewCompletion(make(chan struct{}, 1))
	r.DeliverBatch(t.Context(), "news", Line, lines("b", 2), done)
	done.Done()
	if !done.Complete() {
		t.Fatal("a Broadcast line without a connection was not acknowledged")
	}
	if n := testutil.ToFloat64(m.Dropped.WithLabelValues("news", ReasonNoConnection)); n != 2 {
		t.Fatalf("no_connection = %v, want 2", n)
	}
}

// TestAnyOneParkIsBounded: beyond queueBytes of parked lines, a line is counted
// no_connection at once rather than held.
func TestAnyOneParkIsBounded(t *testing.T) {
	m := NewMetrics(nil)
	r := New(logr.Discard(), m)
	defer r.Close()
	spec := anyOneSpec(time.Hour)
	spec.Overflow.QueueBytes = 4
	r.Ensure("jobs", spec)
	done := NewCompletion(make(chan struct{}, 1))
	r.DeliverBatch(t.Context(), "jobs", Line, lines("p", 3), done) // 2 bytes each
	if n := testutil.ToFloat64(m.Dropped.WithLabelValues("jobs", ReasonNoConnection)); n != 1 {
		t.Fatalf("no_connection = %v, want 1 (two lines fit the park)", n)
	}
	done.Done()
}

// TestRunsCountTheirLines: a run of lines from a peer (one payload, one queue item)
// counts as the lines it holds wherever lines are counted: dropped without a
// connection, parked for AnyOne (one line each), dropped when its connection closes
// before writing it.
func TestRunsCountTheirLines(t *testing.T) {
	m := NewMetrics(nil)
	r := New(logr.Discard(), m)
	defer r.Close()
	run := []buffer.Payload{{Data: []byte("a\nb\nc\n"), Run: 3}}

	r.Ensure("news", discovery.Spec{Overflow: discovery.Overflow{MaxWait: time.Hour}}.WithDefaults())
	done := NewCompletion(make(chan struct{}, 1))
	r.DeliverBatch(t.Context(), "news", Line, run, done)
	done.Done()
	if n := testutil.ToFloat64(m.Dropped.WithLabelValues("news", ReasonNoConnection)); n != 3 {
		t.Fatalf("no_connection = %v, want 3", n)
	}

	jobs := r.Ensure("jobs", anyOneSpec(time.Hour))
	parked := NewCompletion(make(chan struct{}, 1))
	r.DeliverBatch(t.Context(), "jobs", Line, run, parked)
	c := jobs.Attach(Line, "", func() {})
	got := c.Queue.Take(nil)
	if len(got) != 3 || string(got[0].Data) != "a" || string(got[2].Data) != "c" {
		t.Fatalf("the next connection got %d items, want the run's 3 lines one by one", len(got))
	}
	c.Written(got)
	parked.Done()
	if !parked.Complete() || testutil.ToFloat64(m.LinesOut.WithLabelValues("jobs")) != 3 {
		t.Fatalf("complete %v, lines out %v; want the parked run written as 3 lines",
			parked.Complete(), testutil.ToFloat64(m.LinesOut.WithLabelValues("jobs")))
	}

	queued := NewCompletion(make(chan struct{}, 1))
	r.DeliverBatch(t.Context(), "jobs", Line, run, queued)
	c.Detach()
	queued.Done()
	if n := testutil.ToFloat64(m.Dropped.WithLabelValues("jobs", ReasonClosed)); n != 3 || !queued.Complete() {
		t.Fatalf("receiver_closed = %v, complete %v; want 3, true", n, queued.Complete())
	}
}
