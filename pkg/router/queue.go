package router

import (
	"context"
	"sync"
	"time"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/internal/wake"
	"github.com/podipc/podipc/pkg/discovery"
)

// Result is the outcome of offering a message to a bounded queue.
type Result int

const (
	// Queued means the message is in the queue.
	Queued Result = iota
	// Dropped means the message was not queued; the reason says why.
	Dropped
	// Disconnect means the channel's policy is Disconnect and the receiver is too slow:
	// the caller must end the receiver's connection (the message is dropped).
	Disconnect
)

// Bound is the overflow rule of one receiver's queue, shared by local connection queues
// and peer link queues: the bytes the queue holds, counted against its limit, and the
// policy that decides what a message does when they would exceed it. It is set up once
// (Init) with what it waits on, the queue's lock, the signal the queue broadcasts when it
// shrinks and the queue's closed flag; its methods are called with that lock held.
type Bound struct {
	mu     *sync.Mutex
	space  *buffer.Signal
	closed *bool
	// bytes is what the queue holds (Add).
	bytes int
	// overflowing is true from the moment WaitThenDrop (or Block, after MaxBlock) gave
	// up waiting until the queue drains below half: within one overflow episode lines
	// are dropped without waiting, counted with reason.
	overflowing bool
	reason      string
	// budget is the sidecar's memory budget (nil: none), which every message must fit
	// beside the queue's own limit (docs/design.md §8.7).
	budget *buffer.Budget
}

// giveUp starts an overflow episode that drops for reason.
func (b *Bound) giveUp(reason string) (Result, string) {
	b.overflowing, b.reason = true, reason
	return Dropped, reason
}

// Init gives the bound the queue's lock mu, the signal space the queue broadcasts
// whenever it shrinks, and the queue's closed flag (read under mu).
func (b *Bound) Init(mu *sync.Mutex, space *buffer.Signal, closed *bool) {
	b.mu, b.space, b.closed = mu, space, closed
}

// UseBudget makes the bound admit messages only while they also fit budget (nil: no
// budget). Add then charges the budget too; a queue that counts its bytes itself
// (Queue) charges it through its gauge instead.
func (b *Bound) UseBudget(budget *buffer.Budget) { b.budget = budget }

// Bytes returns the bytes the queue holds.
func (b *Bound) Bytes() int { return b.bytes }

// Add counts n more bytes held by the queue (n < 0: fewer), and charges the budget.
func (b *Bound) Add(n int) {
	b.bytes += n
	b.budget.Add(n)
}

// Fits reports whether a message of n bytes enters the queue under limit without
// applying any policy: the fast path, which Admit would also take.
func (b *Bound) Fits(n, limit int) bool {
	return !b.overflowing && b.fits(n, limit)
}

// fits reports whether n more bytes stay within limit and the budget. An empty queue
// takes any message, even over the budget: so a sender that waits for its queue to
// drain is always admitted at last (the budget's margin is one message per queue).
func (b *Bound) fits(n, limit int) bool {
	return b.bytes == 0 || (b.bytes+n <= limit && b.budget.Fits(n))
}

// fullReason is why a message of n bytes waited in vain: the queue's own bound, or,
// when that had room, the memory budget.
func (b *Bound) fullReason(n, limit int, reason string) string {
	if reason == ReasonQueueFull && b.bytes+n <= limit {
		return ReasonMemoryBudget
	}
	return reason
}

// recovered reports whether the overflow episode may end: the queue is below half its
// limit, and, for an episode the budget began, the budget is below three quarters.
func (b *Bound) recovered(limit int) bool {
	if b.reason == ReasonMemoryBudget {
		return b.budget.Recovered()
	}
	return b.bytes < limit/2
}

// Admit applies the overflow policy ov to a message of n bytes entering the queue. The
// lock must be held; Admit releases and re-acquires it while it waits for space.
func (b *Bound) Admit(ctx context.Context, n int, ov discovery.Overflow) (Result, string) {
	limit := ov.QueueBytes
	if b.overflowing {
		if !b.recovered(limit) {
			return Dropped, b.reason
		}
		b.overflowing = false
	}
	if b.fits(n, limit) {
		return Queued, ""
	}
	wait, reason := ov.MaxWait, ReasonQueueFull
	switch ov.Policy {
	case discovery.Disconnect:
		return Disconnect, ReasonSlowConsumer
	case discovery.Block:
		// Lossless only for so long: a receiver that is gone but still listed (its
		// link never acknowledges) must not stall the channel for ever.
		wait, reason = ov.MaxBlock, ReasonBlockTimeout
		if wait <= 0 {
			wait = discovery.DefaultMaxBlock
		}
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	deadline := t.C
	for {
		c := b.space.C()
		b.mu.Unlock()
		select {
		case <-c:
			b.mu.Lock()
		case <-deadline:
			b.mu.Lock()
			if b.fits(n, limit) && !*b.closed {
				return Queued, ""
			}
			return b.giveUp(b.fullReason(n, limit, reason))
		case <-ctx.Done():
			b.mu.Lock()
			return Dropped, ReasonShutdown
		}
		if *b.closed {
			return Dropped, ReasonClosed
		}
		if b.fits(n, limit) {
			return Queued, ""
		}
	}
}

// Queue is the bounded FIFO of one local receiving connection. Many senders push; one
// writer goroutine takes everything queued at once, writes it in one batch, then releases
// the bytes. Bytes taken but not yet released still count against the bound.
type Queue struct {
	mu    sync.Mutex
	items []Item
	// released counts bytes ever written or dropped: the writer's progress, which the
	// Disconnect policy checks before judging a reader slow.
	released uint64
	closed   bool
	bound    Bound
	space    buffer.Signal
	ready    chan struct{}
	// gauge receives every change of the queued bytes, for podipc_queue_bytes.
	gauge func(delta int)
	// dropped counts n messages dropped for reason outside a push (an overflow
	// episode's waiting messages at its deadline).
	dropped func(reason string, n int)

	// An overflow episode under WaitThenDrop: messages that found the queue full wait
	// here, in order, instead of in the pusher, so that one slow reader never holds up
	// whoever feeds it (a peer link's read loop carries every connection of the pod).
	// The writer moves them into the queue as it frees space; at the episode's deadline
	// (maxWait after it began) those still waiting are dropped and the queue drops until
	// it is below half. waiting holds at most one queue bound of bytes.
	waiting   []Item
	waitBytes int
	// episode numbers episodes, so that a late timer never ends a later one;
	// episodeReason is what its deadline drops for: queue_full, or memory_budget when
	// the queue had room but the sidecar's budget had not.
	episode       uint64
	episodeReason string
	timer         *time.Timer
	// limit is the bound the latest push applied, for moving waiting messages in.
	limit int

	// A queued line keeps its whole chunk alive, not just its bytes: a one-byte line
	// read from a peer among 64 KiB of another channel's lines pins 64 KiB. So the
	// queue also counts the chunks it pins (pinned, one ChunkSize per run of items in
	// one chunk, lastRef being the chunk of the last item queued), and once they would
	// exceed the queue's bound it copies each line that would pin another chunk into
	// chunks of its own (compact), densely. A queue that drains never gets there, so the
	// hot path copies nothing; one that does not holds at most its bound in chunks
	// plus its lines' own bytes, and real memory stays within twice queueBytes.
	pinned  int
	lastRef *buffer.Chunk
	compact buffer.Slab
}

// pinLocked charges it, about to enter the queue under limit, for the chunk it pins,
// or copies it out of that chunk when the chunks pinned already reach limit. The caller
// holds a reference on it.Ref for the queue; a copy holds one on its new chunk instead.
func (q *Queue) pinLocked(it *Item, limit int) {
	// The test is apart from the work so that it is inlined: most lines share the
	// chunk of the line queued before them, and the call cost more than the test.
	if it.Ref != nil && it.Ref != q.lastRef {
		q.pinChunkLocked(it, limit)
	}
}

// pinChunkLocked is pinLocked for a line in another chunk than the last one queued.
func (q *Queue) pinChunkLocked(it *Item, limit int) {
	if q.pinned+buffer.ChunkSize <= limit {
		it.pins = true
		q.pinned += buffer.ChunkSize
		q.lastRef = it.Ref
		return
	}
	p := q.compact.Copy(it.Data)
	p.Ref.Retain(1)
	q.compact.Recycle() // the copies keep their chunks; the slab keeps only its current one
	it.Ref.Release(1)
	it.Data, it.Ref = p.Data, p.Ref
	q.lastRef = p.Ref
}

// NewQueue returns an empty queue. gauge, if not nil, observes byte count changes
// (waiting messages included); dropped, if not nil, counts messages an overflow
// episode drops at its deadline.
func NewQueue(gauge func(delta int), dropped func(reason string, n int)) *Queue {
	if gauge == nil {
		gauge = func(int) {}
	}
	if dropped == nil {
		dropped = func(string, int) {}
	}
	q := &Queue{ready: make(chan struct{}, 1), gauge: gauge, dropped: dropped}
	q.bound.Init(&q.mu, &q.space, &q.closed)
	return q
}

// UseBudget makes the queue admit messages only while they fit the sidecar's memory
// budget too (nil: none). The queue's gauge must charge the budget with every change
// it reports (Router does so), which covers the waiting list as well.
func (q *Queue) UseBudget(b *buffer.Budget) { q.bound.UseBudget(b) }

// Push offers it to the queue under policy ov, waiting as the policy says.
func (q *Queue) Push(ctx context.Context, it Item, ov discovery.Overflow) (Result, string) {
	if ov.Policy == discovery.WaitThenDrop {
		p := [1]buffer.Payload{{Data: it.Data, Ref: it.Ref, Run: it.Run}}
		_, res, reason := q.PushBatch(ctx, it.Kind, p[:], it.Done, ov)
		return res, reason
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return Dropped, ReasonClosed
	}
	var res Result
	var reason string
	if ov.Policy == discovery.Disconnect {
		res, reason = q.admitDisconnect(ctx, len(it.Data), ov)
	} else {
		res, reason = q.bound.Admit(ctx, len(it.Data), ov)
	}
	if res != Queued {
		return res, reason
	}
	if q.closed {
		return Dropped, ReasonClosed
	}
	it.Ref.Retain(1)
	q.pinLocked(&it, ov.QueueBytes)
	q.items = append(q.items, it)
	q.bound.bytes += len(it.Data)
	q.gauge(len(it.Data))
	wake.Up(q.ready)
	return Queued, ""
}

// PushBatch offers messages of one kind, in order, under policy ov, taking the lock once
// and waking the writer once (and before any wait). Queued items hold a reference on
// done (which may be nil). It stops at the first message that is not queued and
// returns its index n with the result and reason; n = len(data) means all were queued.
//
// Under WaitThenDrop it never waits: a message that finds the queue full waits in the
// queue's overflow episode (and counts as queued), or is dropped.
func (q *Queue) PushBatch(ctx context.Context, kind Kind, data []buffer.Payload, done *Completion, ov discovery.Overflow) (n int, res Result, reason string) {
	// Every line's chunk is retained before the writer can see it, and what was not
	// queued is released on the way out.
	buffer.RetainLines(data)
	defer func() { buffer.ReleaseLines(data[n:]) }()
	if ov.Policy == discovery.WaitThenDrop {
		return q.pushNoWait(ctx, kind, data, done, ov)
	}
	q.mu.Lock()
	if len(q.waiting) > 0 {
		// The policy changed during a WaitThenDrop episode: finish it first, in order.
		q.mu.Unlock()
		return q.pushNoWait(ctx, kind, data, done, ov)
	}
	added := 0
	res = Queued
	for n = 0; n < len(data); n++ {
		d := data[n].Data
		if q.bound.bytes != 0 && (q.bound.bytes+len(d) > ov.QueueBytes || q.bound.overflowing) && added > 0 {
			// Admit may wait for the writer: let it see what this batch queued.
			q.publishLocked(added)
			added = 0
		}
		if !q.closed && q.bound.Fits(len(d), ov.QueueBytes) {
			res = Queued
		} else if !q.closed {
			if ov.Policy == discovery.Disconnect {
				res, reason = q.admitDisconnect(ctx, len(d), ov)
			} else {
				res, reason = q.bound.Admit(ctx, len(d), ov)
			}
		}
		if q.closed {
			res, reason = Dropped, ReasonClosed
		}
		if res != Queued {
			break
		}
		it := Item{Kind: kind, Data: d, Ref: data[n].Ref, Done: done, Run: data[n].Run}
		q.pinLocked(&it, ov.QueueBytes)
		q.items = append(q.items, it)
		q.bound.bytes += len(d)
		added += len(d)
	}
	if added > 0 {
		q.publishLocked(added)
	}
	q.mu.Unlock()
	return n, res, reason
}

// admitDisconnect applies the Disconnect policy to a message of n bytes: a reader is
// slow when its queue is full and its writer has written nothing for maxWait. While
// the writer makes progress the pusher waits for room. (Judging by a full queue alone
// disconnected readers that keep up, whenever a batch arrived faster than one write.)
func (q *Queue) admitDisconnect(ctx context.Context, n int, ov discovery.Overflow) (Result, string) {
	wait := ov
	wait.Policy = discovery.WaitThenDrop
	for {
		before := q.released
		res, reason := q.bound.Admit(ctx, n, wait)
		if res != Dropped || (reason != ReasonQueueFull && reason != ReasonMemoryBudget) {
			return res, reason
		}
		q.bound.overflowing = false
		if q.released == before || q.closed {
			return Disconnect, ReasonSlowConsumer
		}
	}
}

// pushNoWait is PushBatch under WaitThenDrop; the caller has retained data. Lines from
// peers (done != nil) never wait; a local sender whose lines find the episode's waiting
// list full too waits for room there, at most until the episode ends, as it would have
// for the queue.
func (q *Queue) pushNoWait(ctx context.Context, kind Kind, data []buffer.Payload, done *Completion, ov discovery.Overflow) (int, Result, string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	added := 0
	defer func() {
		if added > 0 {
			q.publishLocked(added)
		}
	}()
	limit := ov.QueueBytes
	q.limit = limit
	for n := 0; n < len(data); {
		d := data[n].Data
		if q.closed {
			return n, Dropped, ReasonClosed
		}
		it := Item{Kind: kind, Data: d, Ref: data[n].Ref, Done: done, Run: data[n].Run}
		if len(q.waiting) > 0 {
			if full, budget := q.waitBytes+len(d) > limit, !q.bound.budget.Fits(added+len(d)); full || budget {
				if done != nil {
					// As many bytes wait as the queue holds, or as the budget has
					// room for: the sender would have had to wait for these.
					if full {
						return n, Dropped, ReasonQueueFull
					}
					return n, Dropped, ReasonMemoryBudget
				}
				if added > 0 {
					q.publishLocked(added)
					added = 0
				}
				c := q.space.C()
				q.mu.Unlock()
				select {
				case <-c:
					q.mu.Lock()
				case <-ctx.Done():
					q.mu.Lock()
					return n, Dropped, ReasonShutdown
				}
				continue
			}
			q.pinLocked(&it, limit)
			q.waiting = append(q.waiting, it)
			q.waitBytes += len(d)
			q.gauge(len(d))
			n++
			continue
		}
		if q.bound.overflowing {
			if !q.bound.recovered(limit) {
				return n, Dropped, q.bound.reason
			}
			q.bound.overflowing = false
		}
		own := q.bound.bytes+len(d) <= limit
		if q.bound.bytes == 0 || (own && q.bound.budget.Fits(added+len(d))) {
			q.pinLocked(&it, limit)
			q.items = append(q.items, it)
			q.bound.bytes += len(d)
			added += len(d)
			n++
			continue
		}
		// The queue (or the budget) is full: an overflow episode begins.
		q.episodeReason = ReasonQueueFull
		if own {
			q.episodeReason = ReasonMemoryBudget
		}
		q.pinLocked(&it, limit)
		q.waiting = append(q.waiting, it)
		q.waitBytes += len(d)
		q.gauge(len(d))
		q.episode++
		ep := q.episode
		q.timer = time.AfterFunc(ov.MaxWait, func() { q.expire(ep) })
		n++
	}
	return len(data), Queued, ""
}

// expire ends overflow episode ep at its deadline: the messages still waiting are
// dropped and the queue drops until it is below half.
func (q *Queue) expire(ep uint64) {
	q.mu.Lock()
	if q.episode != ep || len(q.waiting) == 0 || q.closed {
		q.mu.Unlock()
		return
	}
	left := q.waiting
	n := q.waitBytes
	q.waiting, q.waitBytes, q.timer = nil, 0, nil
	reason := q.episodeReason
	q.bound.giveUp(reason)
	q.mu.Unlock()
	q.gauge(-n)
	q.space.Broadcast() // local senders waiting for room in the episode
	_, pins, lines := settleItems(left)
	q.unpin(pins)
	q.dropped(reason, lines)
}

// admitWaitingLocked moves waiting messages that now fit into the queue, ending the
// episode when none is left. It returns the bytes moved.
func (q *Queue) admitWaitingLocked(limit int) int {
	moved := 0
	k := 0
	for k < len(q.waiting) {
		d := len(q.waiting[k].Data)
		if q.bound.bytes != 0 && q.bound.bytes+d > limit {
			break
		}
		q.items = append(q.items, q.waiting[k])
		q.bound.bytes += d
		moved += d
		k++
	}
	if k == 0 {
		return 0
	}
	q.waitBytes -= moved
	q.waiting = q.waiting[:copy(q.waiting, q.waiting[k:])]
	clear(q.waiting[len(q.waiting) : len(q.waiting)+k])
	if len(q.waiting) == 0 {
		q.timer.Stop()
		q.timer = nil
		q.episode++ // the episode ended in time
	}
	wake.Up(q.ready)
	return moved
}

// publishLocked reports added bytes to the gauge and wakes the writer.
func (q *Queue) publishLocked(added int) {
	q.gauge(added)
	wake.Up(q.ready)
}

// Ready is signalled whenever items are pushed.
func (q *Queue) Ready() <-chan struct{} { return q.ready }

// Take appends every queued item to dst and empties the queue. The caller must Release
// the bytes of what it took once written. An empty dst is swapped with the queue's
// array rather than appended to, so a writer that hands back what it took (cleared)
// moves no items at all.
func (q *Queue) Take(dst []Item) []Item {
	q.mu.Lock()
	if len(dst) == 0 {
		dst, q.items = q.items, dst
	} else {
		dst = append(dst, q.items...)
		clear(q.items)
		q.items = q.items[:0]
	}
	q.mu.Unlock()
	return dst
}

// Release returns n bytes of taken items to the bound, for items that pin no chunk
// (Conn.Written and Conn.Failed return the chunks' charges too).
func (q *Queue) Release(n int) { q.release(n, 0) }

// unpin returns the charges of pins chunks, for dropped items that were waiting.
func (q *Queue) unpin(pins int) {
	if pins == 0 {
		return
	}
	q.mu.Lock()
	q.pinned -= pins * buffer.ChunkSize
	q.mu.Unlock()
}

// release returns n bytes of taken items, and the charges of the pins chunks they
// were charged for.
func (q *Queue) release(n, pins int) {
	if n == 0 && pins == 0 {
		return
	}
	q.mu.Lock()
	q.pinned -= pins * buffer.ChunkSize
	q.bound.bytes -= n
	q.released += uint64(n)
	if len(q.waiting) > 0 && !q.closed {
		q.admitWaitingLocked(q.limit)
	}
	if len(q.items) == 0 && len(q.waiting) == 0 {
		// Nothing queued: an idle connection keeps no chunk alive, not even for
		// comparison (the items still being written hold their own references).
		q.lastRef = nil
		q.compact.Close()
	}
	q.mu.Unlock()
	q.gauge(-n)
	q.space.Broadcast()
}

// Close ends the queue: pending and future pushes are refused, and the items still
// queued are returned so the caller can count them dropped and release their bytes.
func (q *Queue) Close() []Item {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return nil
	}
	q.closed = true
	items := append(q.items, q.waiting...)
	// The caller releases the bytes of everything returned.
	q.bound.bytes += q.waitBytes
	q.items, q.waiting, q.waitBytes = nil, nil, 0
	if q.timer != nil {
		q.timer.Stop()
		q.timer = nil
	}
	// The returned items keep their own references on the slab's chunks.
	q.compact.Close()
	q.mu.Unlock()
	q.space.Broadcast()
	return items
}

// Bytes reports the bytes queued or being written.
func (q *Queue) Bytes() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.bound.bytes
}
