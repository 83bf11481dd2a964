package endpoint

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/ipc"
	"github.com/podipc/podipc/pkg/router"
)

// writeTimeout bounds one blocking write to an app: an app that reads nothing for this
// long loses its connection (and the lines queued for it, counted). A variable so that
// a test can shorten it.
var writeTimeout = time.Minute

// writer is the writing side of one app connection. Two kinds of goroutine write through
// it, one at a time (mu is the right to write, held for a whole batch):
//
//   - its writer goroutine (loop), woken by the connection's queue, which takes everything
//     queued and writes it, blocking as long as the app takes to read it;
//   - whoever queued lines for the connection — a peer link's read loop, another app's
//     reader — which offers to write them at once (offer). It does so only when nobody
//     is writing, and only as far as the socket takes the bytes without blocking.
//
// A line from a peer thus reaches the app from the goroutine that read it off the link,
// without waking another one first: a hand-off less on every round trip, and the
// acknowledgement goes out after the app's write, not before it (docs/design.md §5.5).
// What the socket does not take — the app reads slowly — is carried, in order, to the
// writer goroutine, which writes it first: a slow reader still holds up only its own
// writer, never the goroutine that offered.
type writer struct {
	mu   sync.Mutex
	e    *Endpoint
	conn net.Conn
	c    *router.Conn
	out  sink
	w    *ipc.Writer
	// scratch holds a message translated to the connection's kind.
	scratch bytes.Buffer

	// The batch being written: taken from the queue, batch[:next] encoded, and of
	// those batch[:kept] framed (in place; the unframeable moved out).
	batch       []router.Item
	next, kept  int
	unframeable []router.Item
	// dropped counts the connection's unframeable messages: a peer can send any
	// number, so only the first is logged at info level.
	dropped int
	// carried says a write that must not block left the batch to the writer
	// goroutine: out.rest, the bytes the socket did not take, then batch[next:].
	carried bool
	// ended says the connection failed or closed: nothing more is written.
	ended bool
	// deadline says the writer goroutine has set a write deadline, which it clears
	// before it lets offers write again.
	deadline bool
}

func newWriter(e *Endpoint, conn net.Conn) *writer {
	w := &writer{e: e, conn: conn, out: sink{conn: conn, budget: e.ch.Budget()}}
	if sc, ok := conn.(syscall.Conn); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			w.out.raw = raw
			w.out.writeFn = w.out.writeFd // a method value made once, not per write
		}
	}
	w.w = ipc.NewWriter(&w.out, e.framing)
	return w
}

// loop is the writer goroutine: it writes whatever is queued in one batch per wakeup,
// until stop is closed or the connection fails.
func (w *writer) loop(stop <-chan struct{}) {
	for {
		select {
		case <-w.c.Queue.Ready():
		case <-stop:
			return
		}
		w.mu.Lock()
		ok := w.drain()
		w.mu.Unlock()
		if !ok {
			return
		}
	}
}

// drain is the writer goroutine's turn: it finishes a carried batch, then writes what
// is queued. It reports false once the connection has failed.
func (w *writer) drain() bool {
	if w.ended {
		return false
	}
	if w.carried {
		w.out.direct = false
		w.setDeadline()
		if err := w.out.flushRest(); err != nil {
			w.fail()
			return false
		}
		w.writeBatch(false)
	}
	if !w.ended {
		w.batch = w.c.Queue.Take(w.batch[:0])
		w.writeBatch(false)
	}
	if w.deadline && !w.ended {
		// The deadline bounds this goroutine's blocking writes only. Left set, it would
		// expire while offers write, and Go refuses any write, even one that cannot
		// block, once a connection's deadline has passed.
		_ = w.conn.SetWriteDeadline(time.Time{})
		w.deadline = false
	}
	return !w.ended
}

// setDeadline bounds the blocking writes that follow by writeTimeout.
func (w *writer) setDeadline() {
	_ = w.conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	w.deadline = true
}

// offer writes what is queued for the connection from the calling goroutine, if nobody
// is writing and the socket takes it without blocking (router.Conn's offer). It never
// blocks: the queue has woken the writer goroutine, which takes what offer leaves.
func (w *writer) offer() {
	if w.out.raw == nil || !w.mu.TryLock() {
		return
	}
	defer w.mu.Unlock()
	if w.carried || w.ended {
		return
	}
	w.batch = w.c.Queue.Take(w.batch[:0])
	w.writeBatch(true)
}

// writeBatch encodes batch[next:] and writes it out, then settles the batch. direct says
// the calling goroutine must not block: if the socket is full, the batch is left carried
// for the writer goroutine (which the queue has woken) instead.
func (w *writer) writeBatch(direct bool) {
	if len(w.batch) == 0 {
		return
	}
	w.out.direct, w.out.blocked = direct, false
	if !direct {
		// Before the first byte: a batch larger than the ipc.Writer's buffer writes
		// through while it is encoded, not only at the flush.
		w.setDeadline()
	}
	for ; w.next < len(w.batch); w.next++ {
		if w.out.blocked {
			w.carried = true
			return
		}
		err := w.e.encode(w.w, w.batch[w.next], &w.scratch)
		if errors.Is(err, ipc.ErrUnframeable) {
			w.dropUnframeable(err)
			continue
		}
		if err != nil {
			w.fail()
			return
		}
		w.batch[w.kept] = w.batch[w.next]
		w.kept++
	}
	if err := w.w.Flush(); err != nil {
		w.fail()
		return
	}
	if w.out.blocked {
		w.carried = true
		return
	}
	w.c.Written(w.batch[:w.kept])
	w.c.Failed(w.unframeable, router.ReasonUnframeable)
	w.reset()
}

// dropUnframeable moves batch[next], which the connection's framing cannot carry, out
// of the batch: only that message is dropped, the connection goes on.
func (w *writer) dropUnframeable(err error) {
	w.dropped++
	log := w.e.log.V(1)
	if w.dropped == 1 {
		log = w.e.log
	}
	log.Info("Dropped a message this connection cannot carry", "conn", w.c.Name(),
		"reason", router.ReasonUnframeable, "dropped", w.dropped, "err", err.Error())
	w.unframeable = append(w.unframeable, w.batch[w.next])
}

// fail ends the connection after a write error. Whether the bytes written so far reached
// the app is unknown, so the whole batch counts as dropped: nothing is acknowledged that
// may be lost.
func (w *writer) fail() {
	w.c.Failed(w.batch[:w.kept], router.ReasonClosed)
	w.c.Failed(w.batch[w.next:], router.ReasonClosed) // batch[kept:next] were moved
	w.c.Failed(w.unframeable, router.ReasonUnframeable)
	w.reset()
	w.ended = true
	w.out.dropRest()
	_ = w.conn.Close()
}

// abandon ends the writer once its goroutine has returned: a batch still carried is
// counted dropped (the connection is closed), and later offers write nothing.
func (w *writer) abandon() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.carried {
		w.fail()
	}
	w.ended = true
}

// reset empties the batch, keeping its arrays.
func (w *writer) reset() {
	clear(w.batch)
	clear(w.unframeable)
	w.batch, w.unframeable = w.batch[:0], w.unframeable[:0]
	w.next, w.kept, w.carried = 0, 0, false
}

// encode translates one item to the connection's kind and buffers it.
func (e *Endpoint) encode(w *ipc.Writer, it router.Item, scratch *bytes.Buffer) error {
	switch {
	case it.Kind == e.kind:
		return w.WriteMessage(it.Data)
	case e.kind == router.Line: // a node-ipc message reaches a line client as compact JSON
		scratch.Reset()
		if err := json.Compact(scratch, it.Data); err != nil {
			return fmt.Errorf("%w: %w", ipc.ErrUnframeable, err)
		}
		return w.WriteMessage(scratch.Bytes())
	default: // a line reaches a node-ipc client as {"type":"message","data":"<line>"}
		ev, err := ipc.EncodeEvent("message", string(it.Data))
		if err != nil {
			return fmt.Errorf("%w: %w", ipc.ErrUnframeable, err)
		}
		return w.WriteMessage(ev)
	}
}

// sink is what a connection's ipc.Writer writes to: the socket, with or without
// blocking.
type sink struct {
	conn net.Conn
	// raw writes to the socket's descriptor without waiting (nil: writes always block).
	raw     syscall.RawConn
	writeFn func(fd uintptr) bool
	// direct says a write must not block. Once one finds the socket full, blocked is
	// set and everything after it waits in rest, in order, for a blocking write.
	direct, blocked bool
	rest            []byte
	// budget is charged with rest while it holds bytes: the lines' own bytes stay
	// charged in their queue until written, and rest is a second copy of some of them
	// (at most the ipc.Writer's buffer and one message).
	budget *buffer.Budget
	// The arguments and results of writeFd, in fields so that no closure is made per
	// write.
	p   []byte
	n   int
	err error
}

// Write writes p whole: through the socket, blocking unless direct; in direct mode
// what the socket does not take is kept in rest, and Write still reports it written
// (the ipc.Writer must not treat it as a short write).
func (s *sink) Write(p []byte) (int, error) {
	if !s.direct {
		if err := s.flushRest(); err != nil {
			return 0, err
		}
		return s.conn.Write(p)
	}
	if s.blocked {
		s.keep(p)
		return len(p), nil
	}
	n, err := s.tryWrite(p)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		// A deadline is the writer goroutine's, for its blocking writes; it cannot
		// judge a write that never waits. Leave the bytes to that goroutine.
		err = nil
	}
	if err != nil {
		return n, err
	}
	if n < len(p) {
		s.blocked = true
		s.keep(p[n:])
	}
	return len(p), nil
}

// keep appends p to rest.
func (s *sink) keep(p []byte) {
	s.rest = append(s.rest, p...)
	s.budget.Add(len(p))
}

// dropRest forgets rest (the connection failed).
func (s *sink) dropRest() {
	s.budget.Add(-len(s.rest))
	s.rest = nil
}

// flushRest writes, blocking, what a direct write left.
func (s *sink) flushRest() error {
	if len(s.rest) == 0 {
		return nil
	}
	_, err := s.conn.Write(s.rest)
	// An idle connection keeps no buffer: rest is rare (a reader slower than its peers).
	s.dropRest()
	return err
}

// tryWrite writes as much of p as the socket takes now.
func (s *sink) tryWrite(p []byte) (int, error) {
	s.p, s.n, s.err = p, 0, nil
	if err := s.raw.Write(s.writeFn); err != nil {
		s.err = err
	}
	n, err := s.n, s.err
	s.p, s.err = nil, nil
	return n, err
}

// writeFd is tryWrite's write on the descriptor. It returns true whatever happens, so
// that RawConn.Write never waits for the socket to become writable.
func (s *sink) writeFd(fd uintptr) bool {
	for s.n < len(s.p) {
		k, err := syscall.Write(int(fd), s.p[s.n:])
		if k > 0 {
			s.n += k
		}
		switch {
		case errors.Is(err, syscall.EINTR):
			continue
		case errors.Is(err, syscall.EAGAIN):
			return true
		case err != nil:
			s.err = err
			return true
		case k <= 0:
			return true
		}
	}
	return true
}
