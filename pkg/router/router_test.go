package router

import (
	"context"
	"fmt"
	"math"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"go.uber.org/goleak"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/discovery"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func ov(p discovery.OverflowPolicy, queue int) discovery.Overflow {
	return discovery.Overflow{Policy: p, MaxWait: 10 * time.Millisecond, QueueBytes: queue}
}

// TestQueueOverflow: the policies as docs/design.md §8.3 states them.
func TestQueueOverflow(t *testing.T) {
	item := Item{Data: make([]byte, 10)}
	ctx := t.Context()
	t.Run("WaitThenDrop waits off the pusher, then drops until below half", func(t *testing.T) {
		var dropped atomic.Int32
		q := NewQueue(nil, func(reason string, n int) {
			if reason == ReasonQueueFull {
				dropped.Add(int32(n))
			}
		})
		push := func() (Result, string) { return q.Push(ctx, item, ov(discovery.WaitThenDrop, 100)) }
		for range 10 {
			if res, _ := push(); res != Queued {
				t.Fatal("a push within the bound was refused")
			}
		}
		// Full: the line waits in the queue's overflow episode; the pusher does not.
		if res, _ := push(); res != Queued {
			t.Fatal("a line that found the queue full was not held for maxWait")
		}
		// The writer frees space within maxWait: the waiting line goes in, in order.
		taken := q.Take(nil)
		q.Release(len(taken[0].Data) * len(taken))
		if got := len(q.Take(nil)); got != 1 {
			t.Fatalf("after the writer freed space, %d lines queued, want the 1 that waited", got)
		}
		q.Release(10)
		// A new episode the writer does not end: dropped at its deadline, counted.
		for range 10 {
			_, _ = push()
		}
		if res, _ := push(); res != Queued {
			t.Fatal("the second episode did not hold its first line")
		}
		for dropped.Load() != 1 {
			time.Sleep(time.Millisecond) // the episode's deadline is maxWait away
		}
		if res, reason := push(); res != Dropped || reason != ReasonQueueFull {
			t.Fatalf("after the episode: %v %s", res, reason)
		}
		taken = q.Take(nil)
		q.Release(len(taken[0].Data) * 4) // 60 bytes left: not below half
		if res, _ := push(); res != Dropped {
			t.Fatal("the overflow episode ended before the queue was below half")
		}
		q.Release(20) // 40 bytes: below half
		if res, _ := push(); res != Queued {
			t.Fatal("the episode did not end below half")
		}
		settleItems(q.Close())
	})
	t.Run("Block waits for space", func(t *testing.T) {
		q := NewQueue(nil, nil)
		_, _ = q.Push(ctx, item, ov(discovery.Block, 10))
		done := make(chan Result)
		go func() { r, _ := q.Push(ctx, item, ov(discovery.Block, 10)); done <- r }()
		select {
		case <-done:
			t.Fatal("Block did not wait")
		case <-time.After(50 * time.Millisecond):
		}
		q.Take(nil)
		q.Release(10)
		if r := <-done; r != Queued {
			t.Fatalf("after space: %v", r)
		}
	})
	t.Run("Disconnect", func(t *testing.T) {
		q := NewQueue(nil, nil)
		_, _ = q.Push(ctx, item, ov(discovery.Disconnect, 10))
		if r, reason := q.Push(ctx, item, ov(discovery.Disconnect, 10)); r != Disconnect || reason != ReasonSlowConsumer {
			t.Fatalf("got %v %s", r, reason)
		}
	})
}

// fakeRemote is a Remote that records what it is sent.
type fakeRemote struct {
	id    string
	conns int
	got   []string
}

func (f *fakeRemote) ID() string { return f.id }
func (f *fakeRemote) Send(_ context.Context, _ string, _ Kind, data buffer.Payload, _ bool, _ discovery.Overflow) (Result, string) {
	f.got = append(f.got, string(data.Data))
	return Queued, ""
}
func (f *fakeRemote) SendBatch(_ context.Context, _ string, _ Kind, data []buffer.Payload, _ discovery.Overflow) (int, Result, string) {
	for _, d := range data {
		f.got = append(f.got, string(d.Data))
	}
	return len(data), Queued, ""
}
func (f *fakeRemote) Presence(string) (int, bool) { return f.conns, true }

// TestAnyOneRoundRobin: candidates are the own pod (if another connection exists)
// and remotes advertising a connection; remotes without one are skipped.
func TestAnyOneRoundRobin(t *testing.T) {
	r := New(logr.Discard(), nil)
	defer r.Close()
	ch := r.Ensure("jobs", discovery.Spec{Delivery: discovery.AnyOne})
	sender := ch.Attach(Line, "", func() {})
	other := ch.Attach(Line, "", func() {})
	b, c, idle := &fakeRemote{id: "b", conns: 1}, &fakeRemote{id: "c", conns: 2}, &fakeRemote{id: "d"}
	ch.SetMembers([]Remote{c, idle, b}, []bool{true, true, true}, []bool{true, true, true})
	for i := range 9 {
		ch.Route(t.Context(), sender, Line, []byte{byte('0' + i)})
	}
	local := other.Queue.Take(nil)
	if len(local) != 3 || len(b.got) != 3 || len(c.got) != 3 || len(idle.got) != 0 {
		t.Fatalf("local %d, b %d, c %d, idle %d; want 3, 3, 3, 0", len(local), len(b.got), len(c.got), len(idle.got))
	}
	if len(sender.Queue.Take(nil)) != 0 {
		t.Fatal("the sender received its own line")
	}
	// Only the sender on the channel and no remote: wait maxWait, drop no_receiver.
	other.Detach()
	ch.SetMembers(nil, nil, nil)
	ch.Route(t.Context(), sender, Line, []byte("x"))
	sender.Detach()
}

// TestQueueCompactsSparseLines: a queue that does not drain pins at most its bound in
// whole chunks; each further line that would pin another chunk is copied into the
// queue's own chunks, its original chunk is released at once, and every line reads
// back intact and in order. A queue that drains copies nothing.
func TestQueueCompactsSparseLines(t *testing.T) {
	const limit = 4 * buffer.ChunkSize
	spec := ov(discovery.WaitThenDrop, limit)
	q := NewQueue(nil, nil)
	var originals []*buffer.Chunk
	for i := range 100 {
		c := buffer.NewChunk() // a read chunk holding one line of this queue among others' bytes
		line := append(c.Bytes()[:0], byte('a'+i%26), byte(i))
		originals = append(originals, c)
		if n, res, _ := q.PushBatch(t.Context(), Line, []buffer.Payload{{Data: line, Ref: c}}, nil, spec); res != Queued || n != 1 {
			t.Fatalf("line %d not queued", i)
		}
		c.Release(1) // the reader moves on to its next chunk
	}
	kept := 0
	for _, c := range originals {
		if c.Refs() > 0 {
			kept++
		}
	}
	if kept != limit/buffer.ChunkSize {
		t.Fatalf("the queue keeps %d read chunks alive, want %d (its bound)", kept, limit/buffer.ChunkSize)
	}
	items := q.Take(nil)
	own := map[*buffer.Chunk]bool{}
	for i, it := range items {
		if len(it.Data) != 2 || it.Data[0] != byte('a'+i%26) || it.Data[1] != byte(i) {
			t.Fatalf("line %d reads %q", i, it.Data)
		}
		own[it.Ref] = true
	}
	if len(own) != kept+1 {
		t.Fatalf("the lines live in %d chunks, want %d read chunks and one of the queue's", len(own), kept+1)
	}
	n, pins, _ := settleItems(items)
	q.release(n, pins) // as Conn.Written does
	for i, c := range originals {
		if r := c.Refs(); r != 0 {
			t.Fatalf("read chunk %d still has %d references", i, r)
		}
	}

	// Draining: each line is taken before the next arrives, nothing is copied.
	for i := range 100 {
		c := buffer.NewChunk()
		line := append(c.Bytes()[:0], 'x')
		q.PushBatch(t.Context(), Line, []buffer.Payload{{Data: line, Ref: c}}, nil, spec)
		c.Release(1)
		items = q.Take(items[:0])
		if len(items) != 1 || items[0].Ref != c {
			t.Fatalf("line %d of a draining queue was copied", i)
		}
		n, pins, _ := settleItems(items)
		q.release(n, pins)
	}
}

// countRemote counts the lines it is sent, from any number of senders.
type countRemote struct {
	id string
	n  atomic.Int64
}

func (f *countRemote) ID() string { return f.id }
func (f *countRemote) Send(context.Context, string, Kind, buffer.Payload, bool, discovery.Overflow) (Result, string) {
	f.n.Add(1)
	return Queued, ""
}
func (f *countRemote) SendBatch(_ context.Context, _ string, _ Kind, data []buffer.Payload, _ discovery.Overflow) (int, Result, string) {
	f.n.Add(int64(len(data)))
	return len(data), Queued, ""
}
func (f *countRemote) Presence(string) (int, bool) { return 1, true }

// TestAnyOneFairOverManyMembers: AnyOne lines from 4 concurrent senders over 16
// and 64 candidate members (and 4,100, beyond what the candidate set holds on the
// stack) are spread evenly (every member within one line of the
// others, since each line takes the next turn of one shared ring), the members that
// are not ready get none, and routing a line allocates nothing however many members
// the channel has.
func TestAnyOneFairOverManyMembers(t *testing.T) {
	for _, n := range []int{16, 64, 4100} {
		t.Run(strconv.Itoa(n), func(t *testing.T) {
			r := New(logr.Discard(), nil)
			defer r.Close()
			ch := r.Ensure("jobs", discovery.Spec{Delivery: discovery.AnyOne})
			remotes := make([]Remote, n+4)
			ready := make([]bool, n+4)
			for i := range remotes {
				remotes[i], ready[i] = &countRemote{id: fmt.Sprintf("m%03d", i)}, i < n
			}
			ch.SetMembers(remotes, ready, ready)
			senders, perSender := 4, 1000
			if n > perSender {
				perSender = 2 * n
			}
			var wg sync.WaitGroup
			for range senders {
				// No local connection: the own pod is no candidate, as in a pod that
				// only sends.
				wg.Go(func() {
					for range perSender {
						ch.Route(t.Context(), nil, Line, []byte("job"))
					}
				})
			}
			wg.Wait()
			lo, hi, total := int64(math.MaxInt64), int64(0), int64(0)
			for i, rem := range remotes {
				got := rem.(*countRemote).n.Load()
				total += got
				if i >= n {
					if got != 0 {
						t.Errorf("member %d is not ready and got %d lines", i, got)
					}
					continue
				}
				lo, hi = min(lo, got), max(hi, got)
			}
			t.Logf("N=%d: %d lines, per member min %d max %d (max/min %.3f)", n, total, lo, hi, float64(hi)/float64(lo))
			if total != int64(senders*perSender) || hi-lo > 1 {
				t.Fatalf("%d lines over %d members: min %d, max %d; want %d, spread ≤ 1", total, n, lo, hi, senders*perSender)
			}
			if n > 4095 {
				return // beyond what the candidate set holds on the stack
			}
			line := []buffer.Payload{{Data: []byte("job")}}
			if a := testing.AllocsPerRun(1000, func() { ch.RouteBatch(t.Context(), nil, Line, line) }); a != 0 {
				t.Errorf("an AnyOne line over %d members allocates %.1f times", n, a)
			}
		})
	}
}
