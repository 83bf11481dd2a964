// Package buffer is the shared memory of the data plane: reference-counted 64 KiB
// chunks (1 KiB ones for peer readers on quiet links) that lines live in from the moment they are read until every queue that holds
// them has written or dropped them, the slabs that copy app lines into chunks, the
// payload references the queues pass around, and the signal a bounded queue broadcasts
// when it has room. It exists for pkg/router, pkg/peer and pkg/endpoint, which share
// these buffers without copying a line between them (docs/design.md §5); nothing
// outside the module needs it.
package buffer

import (
	"bytes"
	"iter"
	"sync"
	"sync/atomic"
	"unsafe"
)

// Payload is a message copied into a slab chunk, with the reference that keeps the chunk.
type Payload struct {
	Data []byte
	// Ref is nil for messages that were not copied into a chunk.
	Ref *Chunk
	// Run is how many messages Data holds when it is a run of them, each ended by its
	// kind's delimiter, as a RUN frame carries them (pkg/peer); 0 when Data is one
	// message without its delimiter.
	Run uint32
}

// Lines returns how many messages p holds.
func (p Payload) Lines() int { return max(int(p.Run), 1) }

// SplitRuns returns lines with every run split into its messages (each without its
// delimiter, in place in the run's chunk), for a receiver that takes messages one by one;
// lines itself if it holds no run.
func SplitRuns(lines []Payload, delim byte) []Payload {
	n := 0
	for _, l := range lines {
		n += l.Lines()
	}
	if n == len(lines) {
		return lines
	}
	out := make([]Payload, 0, n)
	for _, l := range lines {
		if l.Run == 0 {
			out = append(out, l)
			continue
		}
		for m := range Messages(l.Data, delim) {
			out = append(out, Payload{Data: m, Ref: l.Ref})
		}
	}
	return out
}

// Messages yields the messages of run, each ended by delim (a RUN frame's payload, a
// run payload), without their delimiters and in place: the one way the data plane
// splits a run, wherever it must take its messages one by one. Bytes after the last
// delimiter are not a message and are not yielded.
func Messages(run []byte, delim byte) iter.Seq[[]byte] {
	return func(yield func([]byte) bool) {
		for {
			i := bytes.IndexByte(run, delim)
			if i < 0 || !yield(run[:i:i]) {
				return
			}
			run = run[i+1:]
		}
	}
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

// SmallChunkSize is the size of the chunks a peer reader waits in while its link is
// quiet: a sidecar has two readers per peer, and a 64 KiB chunk each would make an idle
// link cost more than everything else it holds (docs/design.md §8.7). 1 KiB: what a
// quiet link reads (keepalives, acknowledgements, presence, a few lines) is tens of bytes
// a read, and four such chunks share a page of the heap, where a 4 KiB one made every
// waiting reader keep a resident page of its own.
const SmallChunkSize = 1 << 10

var (
	chunkPool      = sync.Pool{New: func() any { return &Chunk{buf: make([]byte, 0, ChunkSize)} }}
	smallChunkPool = sync.Pool{New: func() any { return &Chunk{buf: make([]byte, 0, SmallChunkSize)} }}
)

// NewChunk returns an empty pooled chunk holding one reference, for a reader that reads
// straight into chunks (Bytes) rather than copying messages into a Slab.
func NewChunk() *Chunk {
	c := chunkPool.Get().(*Chunk)
	c.refs.Store(1)
	return c
}

// NewSmallChunk is NewChunk with a buffer of SmallChunkSize bytes.
func NewSmallChunk() *Chunk {
	c := smallChunkPool.Get().(*Chunk)
	c.refs.Store(1)
	return c
}

// Bytes returns the chunk's whole buffer (ChunkSize or SmallChunkSize bytes), for a
// reader to fill.
func (c *Chunk) Bytes() []byte { return c.buf[:cap(c.buf)] }

// Refs returns the references held on the chunk, for tests that check every reference
// is released exactly once.
func (c *Chunk) Refs() int { return int(c.refs.Load()) }

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
		if cap(c.buf) == SmallChunkSize {
			smallChunkPool.Put(c)
		} else {
			chunkPool.Put(c)
		}
	case r < 0:
		panic("buffer: chunk released more often than retained")
	}
}

// RetainLines takes one reference on the chunk of each of lines, one atomic operation
// per run of lines sharing a chunk. A queue retains a whole batch before it can be
// taken (and released) by the queue's writer, and releases what it did not keep.
func RetainLines(lines []Payload) { chunkRuns(lines, (*Chunk).Retain) }

// ReleaseLines releases one reference on the chunk of each of lines, as RetainLines took.
func ReleaseLines(lines []Payload) { chunkRuns(lines, (*Chunk).Release) }

// chunkRuns calls f once per run of lines sharing a chunk, with the run's length.
//
// The loop is written out again, for their own element types, by router.settleItems
// and the peer link's outbox: a generic form (a key function per
// element) is not inlined and costs an indirect call per line on the hot path.
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
	c := s.room(len(b))
	start := len(c.buf)
	c.buf = append(c.buf, b...)
	return Payload{Data: c.buf[start:len(c.buf):len(c.buf)], Ref: c}
}

// CopyLine is Copy for a message that its framing ends with delim: the copy is followed
// by delim in its chunk, so that consecutive messages copied this way lie in the chunk
// exactly as a connection of that framing carries them, and Run can hand them on as one
// piece. The payload is the message alone.
func (s *Slab) CopyLine(b []byte, delim byte) Payload {
	if len(b) >= ChunkSize/4 {
		return Payload{Data: append([]byte(nil), b...)}
	}
	c := s.room(len(b) + 1)
	start := len(c.buf)
	c.buf = append(append(c.buf, b...), delim)
	end := len(c.buf) - 1
	if start == end {
		// An empty slice with no capacity would point at the chunk's start, not
		// here (Go does not let one point past what it may reach), and end the run.
		return Payload{Data: c.buf[start:end:len(c.buf)], Ref: c}
	}
	return Payload{Data: c.buf[start:end:end], Ref: c}
}

// room returns the chunk to copy n more bytes into.
func (s *Slab) room(n int) *Chunk {
	if s.cur == nil || cap(s.cur.buf)-len(s.cur.buf) < n {
		if s.cur != nil {
			s.full = append(s.full, s.cur)
		}
		s.cur = chunkPool.Get().(*Chunk)
		s.cur.refs.Store(1)
	}
	return s.cur
}

// Run returns how many of lines, from the first, form a run, and the run's bytes: lines
// that follow one another in one chunk, each ended by delim among the bytes the chunk's
// filler wrote (as CopyLine leaves them), at most maxCount lines and maxBytes bytes,
// delimiters included. A run is the lines of one read as a connection of their framing
// carries them, so it travels as one piece. It returns 0 and nil when the first line is
// not in a chunk or not followed by delim there.
//
// Only the chunk's filled bytes count (len of its buffer): the byte after a line copied
// by Copy is where the next copy goes, so a delimiter found there by chance could be
// overwritten while the run is queued.
func Run(lines []Payload, delim byte, maxBytes, maxCount int) (int, []byte) {
	c := lines[0].Ref
	if c == nil {
		return 0, nil
	}
	base := uintptr(unsafe.Pointer(unsafe.SliceData(c.buf)))
	filled := uintptr(len(c.buf))
	start := uintptr(unsafe.Pointer(unsafe.SliceData(lines[0].Data))) - base
	end, n := start, 0
	for n < len(lines) && n < maxCount {
		l := lines[n]
		if l.Ref != c || uintptr(unsafe.Pointer(unsafe.SliceData(l.Data)))-base != end {
			break
		}
		e := end + uintptr(len(l.Data)) // where its delimiter must be
		if e >= filled || c.buf[e] != delim || e+1-start > uintptr(maxBytes) {
			break
		}
		end, n = e+1, n+1
	}
	if n == 0 {
		return 0, nil
	}
	return n, c.buf[start:end:end]
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
