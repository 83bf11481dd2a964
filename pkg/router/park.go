package router

import (
	"context"
	"slices"
	"time"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/discovery"
)

// parkedBatch is a run of AnyOne lines from a peer that found no local connection on
// their channel. They stay unacknowledged (the batch holds a reference on done per line)
// for up to maxWait, the time a receiver may hold any line's acknowledgement:
//
//   - a connection that attaches meanwhile (the app reconnecting) gets them first;
//   - a sidecar that shuts down meanwhile says GOODBYE with them unacknowledged, and
//     every sender reroutes its unacknowledged AnyOne lines to another member
//     (docs/guarantees.md); a sidecar killed meanwhile is a restarted receiver to its
//     senders, which reroute them too;
//   - at maxWait they are counted no_connection and acknowledged, as before.
//
// This closes the window in which a pod's app has closed its connection and its
// PRESENCE update has not yet reached the senders: a line they route to it then is
// handed on to another member instead of being counted on a sidecar that is about to
// exit (docs/reliability.md).
type parkedBatch struct {
	kind  Kind
	lines [][]byte
	bytes int
	done  *Completion
	timer *time.Timer
}

// park holds data (lines of kind from a peer, covered by done) for the next local
// connection, unless a connection attached since conns was read: it then returns the
// connections to deliver to now, and nil once the lines are parked. Lines beyond the
// channel's queueBytes of parked lines are not parked: they are counted no_connection.
// The lines are copied: the peer's read buffer is not pinned while nobody reads them.
func (ch *Channel) park(kind Kind, data []buffer.Payload, done *Completion, ov discovery.Overflow) []*Conn {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	if conns := *ch.conns.Load(); len(conns) > 0 {
		return conns
	}
	b := &parkedBatch{kind: kind, done: done}
	for _, d := range data {
		if ch.parkedBytes+b.bytes+len(d.Data) > ov.QueueBytes {
			break
		}
		b.lines = append(b.lines, slices.Clone(d.Data))
		b.bytes += len(d.Data)
	}
	if n := len(data) - len(b.lines); n > 0 {
		ch.drop(ReasonNoConnection, n)
	}
	if len(b.lines) == 0 {
		return nil
	}
	done.Add(len(b.lines))
	ch.parked = append(ch.parked, b)
	ch.parkedBytes += b.bytes
	b.timer = time.AfterFunc(ov.MaxWait, func() { ch.expireParked(b) })
	return nil
}

// expireParked counts b no_connection and acknowledges it, if it is still parked.
func (ch *Channel) expireParked(b *parkedBatch) {
	ch.mu.Lock()
	i := slices.Index(ch.parked, b)
	if i >= 0 {
		ch.parked = slices.Delete(ch.parked, i, i+1)
		ch.parkedBytes -= b.bytes
	}
	ch.mu.Unlock()
	if i >= 0 {
		ch.drop(ReasonNoConnection, len(b.lines))
		b.done.DoneN(len(b.lines))
	}
}

// unparkLocked hands every parked line, in arrival order, to c, which is not yet
// published (so no line routed after it can overtake them). c's queue is empty and the
// parked lines fit in queueBytes, so pushing never waits. ch.mu is held.
func (ch *Channel) unparkLocked(c *Conn) {
	if len(ch.parked) == 0 {
		return
	}
	ov := ch.spec.Load().Overflow
	for _, b := range ch.parked {
		b.timer.Stop() // an expiry that already fired finds the batch gone
		for _, line := range b.lines {
			ch.pushBatch(context.Background(), c, b.kind, []buffer.Payload{{Data: line}}, b.done, ov)
		}
		b.done.DoneN(len(b.lines))
	}
	clear(ch.parked)
	ch.parked, ch.parkedBytes = ch.parked[:0], 0
}

// releaseParked ends the park without acknowledging its lines on the sidecar's way out
// (Router.Close runs after the peer server said GOODBYE and closed its links, so their
// senders reroute them): their references are released without a count.
func (ch *Channel) releaseParked() {
	ch.mu.Lock()
	parked := ch.parked
	ch.parked, ch.parkedBytes = nil, 0
	ch.mu.Unlock()
	for _, b := range parked {
		b.timer.Stop()
		b.done.DoneN(len(b.lines))
	}
}
