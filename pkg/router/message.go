package router

import (
	"sync"
	"sync/atomic"

	"github.com/podipc/podipc/internal/wake"
)

// Kind says how a message was framed by the app that sent it. Only the receiving edge
// translates between kinds.
type Kind uint8

const (
	// Line is a newline-terminated line from a line-protocol (TCP) client.
	Line Kind = 0
	// NodeIPC is one node-ipc JSON frame ({"type":…,"data":…}) without its '\f'.
	NodeIPC Kind = 1
)

func (k Kind) String() string {
	if k == NodeIPC {
		return "nodeipc"
	}
	return "line"
}

// Drop reasons, the values of the reason label of podipc_dropped_lines_total.
const (
	ReasonQueueFull     = "queue_full"      // a receiver's queue stayed full (WaitThenDrop)
	ReasonSlowConsumer  = "slow_consumer"   // a slow local reader was disconnected (Disconnect)
	ReasonNoReceiver    = "no_receiver"     // AnyOne found no candidate within maxWait
	ReasonPeerRestarted = "peer_restarted"  // the receiving sidecar restarted before acknowledging
	ReasonPeerRemoved   = "peer_removed"    // the receiving pod left the channel before acknowledging
	ReasonShutdown      = "shutdown"        // the sidecar stopped before the line was acknowledged
	ReasonClosed        = "receiver_closed" // the receiving connection ended before the write
	ReasonNoChannel     = "no_channel"      // a peer sent a line for a channel this pod does not serve
	ReasonNoConnection  = "no_connection"   // a line from a peer found no local connection
	ReasonBlockTimeout  = "block_timeout"   // Block held the sender back for maxBlock (its receiver's queue stayed full)
	ReasonUnframeable   = "unframeable"     // a line from a peer cannot be framed for a local connection's protocol
	ReasonMalformed     = "malformed"       // a local node-ipc client sent a frame that is not a node-ipc event
)

// Completion tracks one line received from a peer until every local connection it was
// queued for has written it (or counted a drop). The peer link acknowledges the line's
// sequence number only then, which is what makes guarantee (b) hold: a line the receiving
// sidecar acknowledged has reached the kernel of every local reader.
type Completion struct {
	remaining atomic.Int32
	notify    chan<- struct{}
}

// NewCompletion returns a completion holding one reference (the dispatcher's), which
// signals notify (without blocking) when the last reference is released.
func NewCompletion(notify chan<- struct{}) *Completion {
	c := &Completion{notify: notify}
	c.remaining.Store(1)
	return c
}

// Add takes n more references.
func (c *Completion) Add(n int) { c.remaining.Add(int32(n)) }

// Done releases one reference and reports whether it was the last.
func (c *Completion) Done() bool { return c.DoneN(1) }

// DoneN releases n references and reports whether they were the last. Writers release
// a batch's references at once: one atomic operation per batch rather than per line,
// on a counter the dispatching goroutine shares from another CPU.
func (c *Completion) DoneN(n int) bool {
	if c == nil || n == 0 {
		return false
	}
	if c.remaining.Add(-int32(n)) == 0 {
		wake.Up(c.notify)
		return true
	}
	return false
}

// DoneItems releases the completion references of items, one atomic operation per run
// of items sharing a completion.
func DoneItems(items []Item) {
	for i := 0; i < len(items); {
		j := i + 1
		for j < len(items) && items[j].Done == items[i].Done {
			j++
		}
		items[i].Done.DoneN(j - i)
		i = j
	}
}

// Complete reports whether every reference has been released.
func (c *Completion) Complete() bool { return c.remaining.Load() <= 0 }

// Item is one message in a receiver's queue.
type Item struct {
	Kind Kind
	Data []byte
	// Ref keeps the chunk Data lives in from being reused; the queue's owner releases
	// it once the item is written or dropped.
	Ref *Chunk
	// Done is released once the item has been written or dropped; nil for lines that
	// came from a local app (they need no acknowledgement).
	Done *Completion
	// pins says the queue charged the item for its whole chunk (see Queue.pinLocked).
	pins bool
}

// Payload is a message copied into a slab chunk, with the reference that keeps the chunk.
type Payload struct {
	Data []byte
	// Ref is nil for messages that were not copied into a chunk.
	Ref *Chunk
}

// ChunkSize is the size of the chunks message bytes are copied (or read) into, so the
// hot path neither allocates nor leaves garbage per line.
const ChunkSize = 64 << 10

// Chunk is a reference-counted buffer that lines live in: filled by a Slab (lines from
// local apps) or read into by the peer Reader (lines from peers). Its filler holds one
// reference while it fills it, and every queue entry whose bytes live in it holds one;
// the last release returns it to a pool, so a steady stream of lines reuses a few
// chunks instead of allocating (and collecting) 64 KiB per 64 KiB carried. A release
// too many would hand bytes still queued to a new owner (and panics when it goes below
// zero), so references are taken and released only by the fillers and the queues
// (Queue, peer links), a run of lines at a time.
type Chunk struct {
	buf  []byte
	refs atomic.Int32
}

var chunkPool = sync.Pool{New: func() any { return &Chunk{buf: make([]byte, 0, ChunkSize)} }}

// NewChunk returns an empty pooled chunk holding one reference, for a reader that reads
// straight into chunks (Bytes) rather than copying messages into a Slab.
func NewChunk() *Chunk {
	c := chunkPool.Get().(*Chunk)
	c.refs.Store(1)
	return c
}

// Bytes returns the chunk's whole buffer (ChunkSize bytes), for a reader to fill.
func (c *Chunk) Bytes() []byte { return c.buf[:cap(c.buf)] }

// Retain takes n references.
func (c *Chunk) Retain(n int) {
	if c != nil {
		c.refs.Add(int32(n))
	}
}

// Release drops n references.
func (c *Chunk) Release(n int) {
	if c == nil {
		return
	}
	switch r := c.refs.Add(-int32(n)); {
	case r == 0:
		c.buf = c.buf[:0]
		chunkPool.Put(c)
	case r < 0:
		panic("router: chunk released more often than retained")
	}
}

// ReleaseItems releases the chunk references of items, one atomic operation per run
// of items sharing a chunk.
func ReleaseItems(items []Item) {
	for i := 0; i < len(items); {
		j := i + 1
		for j < len(items) && items[j].Ref == items[i].Ref {
			j++
		}
		items[i].Ref.Release(j - i)
		i = j
	}
}

// RetainLines takes one reference on the chunk of each of lines, one atomic operation
// per run of lines sharing a chunk. A queue retains a whole batch before it can be
// taken (and released) by the queue's writer, and releases what it did not keep.
func RetainLines(lines []Payload) { chunkRuns(lines, (*Chunk).Retain) }

// ReleaseLines releases one reference on the chunk of each of lines, as RetainLines took.
func ReleaseLines(lines []Payload) { chunkRuns(lines, (*Chunk).Release) }

// chunkRuns calls f once per run of lines sharing a chunk, with the run's length.
func chunkRuns(lines []Payload, f func(c *Chunk, n int)) {
	for i := 0; i < len(lines); {
		j := i + 1
		for j < len(lines) && lines[j].Ref == lines[i].Ref {
			j++
		}
		f(lines[i].Ref, j-i)
		i = j
	}
}

// Slab copies message bytes into pooled chunks. It is not safe for concurrent use; each
// reading goroutine owns one.
//
// A copy is valid until the next Recycle: the slab keeps its reference on every chunk
// it filled since then, so the reader hands a batch of lines to the queues without
// taking a reference per line (each queue takes one per run of lines it keeps).
type Slab struct {
	// cur is the chunk being filled; the slab holds a reference on it until it moves on.
	cur *Chunk
	// full are the chunks filled since the last Recycle, each still referenced by the
	// slab because lines of the current batch may live in them.
	full []*Chunk
}

// Copy returns a copy of b that stays valid until the next Recycle (or Close).
func (s *Slab) Copy(b []byte) Payload {
	if len(b) > ChunkSize/4 {
		return Payload{Data: append([]byte(nil), b...)}
	}
	if s.cur == nil || cap(s.cur.buf)-len(s.cur.buf) < len(b) {
		if s.cur != nil {
			s.full = append(s.full, s.cur)
		}
		s.cur = chunkPool.Get().(*Chunk)
		s.cur.refs.Store(1)
	}
	c := s.cur
	start := len(c.buf)
	c.buf = append(c.buf, b...)
	return Payload{Data: c.buf[start:len(c.buf):len(c.buf)], Ref: c}
}

// Recycle ends the validity of the copies made so far: the slab drops its references on
// the chunks it has filled (the queues hold their own on what they kept).
func (s *Slab) Recycle() {
	for i, c := range s.full {
		c.Release(1)
		s.full[i] = nil
	}
	s.full = s.full[:0]
}

// Close recycles and releases the slab's current chunk.
func (s *Slab) Close() {
	s.Recycle()
	s.cur.Release(1)
	s.cur = nil
}

// Signal is a broadcast condition: waiters take C() and the notifier closes it.
type Signal struct {
	mu sync.Mutex
	ch chan struct{}
}

// C returns a channel closed at the next Broadcast.
func (s *Signal) C() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ch == nil {
		s.ch = make(chan struct{})
	}
	return s.ch
}

// Broadcast wakes every waiter.
func (s *Signal) Broadcast() {
	s.mu.Lock()
	if s.ch != nil {
		close(s.ch)
		s.ch = nil
	}
	s.mu.Unlock()
}
