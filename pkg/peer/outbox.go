package peer

import (
	"encoding/binary"
	"sort"
	"sync"
	"unsafe"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/router"
)

// outbox is a link's queue of lines waiting for their acknowledgement: the send queue
// and the retransmit queue in one. It numbers lines, bounds them in bytes per channel,
// encodes them as DATA frames for the session's writer, drops them from the front when
// acknowledged and settles them when no receiver will acknowledge them. It knows
// nothing of connections, so it is tested without a socket (outbox_test.go).
//
// It has no lock of its own: the link's mutex guards it, because the overflow policy
// waits for space on that mutex while the link's state (closed, up) decides what a
// waiting sender does next.
type outbox struct {
	// q holds unacknowledged messages in sequence order; q.items()[next:] are not yet
	// handed to the current session's writer.
	q    fifo[outMsg]
	next int
	// encoding says a session's writer is running. Messages are then encoded into out
	// as they are queued, while out holds less than maxOutBytes, and the writer takes a
	// whole batch by swapping buffers: no queue entry is copied, and a line is copied
	// once, from its chunk into out. What does not fit waits in q[next:] until the
	// writer has room again. Between sessions messages only wait in q; the next session
	// encodes those its receiver has not acknowledged.
	encoding bool
	// runs says the current session's receiver reads RUN frames (version 2); a run
	// queued for one that does not is encoded as one DATA frame per message.
	runs bool
	out  []byte
	// outN counts the messages in out; outSeq is the last one's sequence number.
	outN   int
	outSeq uint64
	// nextSeq is the sequence number of the next message queued.
	nextSeq uint64
	// sentSeq is the highest sequence number possibly seen by the current receiver
	// incarnation: a message is marked sent before it is written.
	sentSeq uint64
	// chans holds the per-channel bounds; last caches the most recent lookup, since
	// consecutive lines are mostly of one channel.
	chans    map[string]*chanState
	lastName string
	last     *chanState
	// unacked is the bytes queued; reported is what the gauge (podipc_peer_unacked_bytes)
	// was told, updated per written batch and per acknowledgement rather than per line.
	unacked, reported int
	gauge             prometheus.Gauge
	// peerGauge is the link's own series of podipc_peer_link_unacked_bytes (nil: none).
	peerGauge prometheus.Gauge
	// space is broadcast whenever the queue shrinks; the channels' bounds wait on it,
	// under mu, and stop waiting once closed is set.
	space  buffer.Signal
	mu     *sync.Mutex
	closed *bool
	// budget is the sidecar's memory budget (nil: none): every channel's bound charges
	// it and admits only what fits it (docs/design.md §8.7).
	budget *buffer.Budget
}

// outMsg is a sequenced message, or a run of consecutive ones, waiting for its
// acknowledgement. The outbox keeps them by value in a fifo: queueing allocates
// nothing. A full queue holds thousands of them, written once and read back at
// acknowledgement long after, so the struct is kept small (40 bytes): the channel name
// lives in st, and the bytes are a pointer and a length rather than a slice.
//
// A run (count > 1) is the Broadcast lines of one app read that lie one after another in
// one chunk, each ended by its kind's delimiter: it is numbered seq … seq+count-1, one
// entry and one copy for all of them, and one RUN frame on the wire (docs/protocol.md).
// A single message (count 1) holds its bytes without a delimiter.
type outMsg struct {
	seq uint64
	st  *chanState
	// ref keeps the bytes' slab chunk (one reference per entry); released when the
	// entry leaves the queue.
	ref    *buffer.Chunk
	ptr    *byte
	n      uint32
	count  uint16
	kind   router.Kind
	anyOne bool
}

// maxRunCount bounds the messages of one run (outMsg.count).
const maxRunCount = 1<<16 - 1

// last returns the sequence number of the entry's last message.
func (m *outMsg) last() uint64 { return m.seq + uint64(m.count) - 1 }

// data returns the message's bytes.
func (m *outMsg) data() []byte { return unsafe.Slice(m.ptr, m.n) }

// size returns the message's length.
func (m *outMsg) size() int { return int(m.n) }

// chanState is the outbox's bound on one channel: bytes queued and not yet
// acknowledged, under the channel's overflow policy.
type chanState struct {
	name  string
	bound router.Bound
	// tail is the part of a DATA body between the sequence number and the payload
	// for each kind (the channel name with its length, then the kind), encoded once
	// per channel rather than once per line and link (appendData).
	tail [2][]byte
}

// newChanState returns the bound of channel name, its DATA tails encoded.
func newChanState(name string) *chanState {
	st := &chanState{name: name}
	for k := range st.tail {
		t := binary.AppendUvarint(nil, uint64(len(name)))
		st.tail[k] = append(append(t, name...), byte(k))
	}
	return st
}

// fifo is a queue of values that reuses its backing array: popped slots at the front
// are reclaimed by moving the live part down once they are at least half of it, so
// pushes and pops cost amortised O(1) and allocate only while the queue grows.
type fifo[T any] struct {
	buf  []T
	head int
}

func (f *fifo[T]) len() int { return len(f.buf) - f.head }

// items returns the queued values, oldest first; valid until the next push or pop.
func (f *fifo[T]) items() []T { return f.buf[f.head:] }

func (f *fifo[T]) push(v T) { *f.add() = v }

// add appends a zero value and returns it, for the caller to fill in place.
func (f *fifo[T]) add() *T {
	if len(f.buf) == cap(f.buf) && f.head > 0 && f.head >= f.len() {
		n := copy(f.buf, f.buf[f.head:])
		clear(f.buf[n:])
		f.buf, f.head = f.buf[:n], 0
	}
	var zero T
	f.buf = append(f.buf, zero)
	return &f.buf[len(f.buf)-1]
}

// pop removes the k oldest values.
func (f *fifo[T]) pop(k int) {
	clear(f.buf[f.head : f.head+k])
	f.head += k
	if f.head == len(f.buf) {
		f.buf, f.head = f.buf[:0], 0
	}
}

// init readies an empty outbox that reports its unacknowledged bytes to gauge (the sum
// over links) and peerGauge (this link's series, nil for none). mu is
// the lock that guards it, closed the flag (read under mu) that says its link has ended.
func (o *outbox) init(gauge, peerGauge prometheus.Gauge, mu *sync.Mutex, closed *bool) {
	o.nextSeq, o.chans, o.gauge, o.peerGauge, o.mu, o.closed = 1, map[string]*chanState{}, gauge, peerGauge, mu, closed
}

// len returns the number of messages queued.
func (o *outbox) len() int { return o.q.len() }

// channel returns the bound of channel.
func (o *outbox) channel(name string) *chanState {
	if o.last != nil && name == o.lastName {
		return o.last
	}
	st := o.chans[name]
	if st == nil {
		st = newChanState(name)
		st.bound.Init(o.mu, &o.space, o.closed)
		st.bound.UseBudget(o.budget)
		o.chans[name] = st
	}
	o.lastName, o.last = name, st
	return st
}

// push queues data as the next message in sequence, and encodes it for the writer if a
// session is up. The caller has retained ref for the message.
func (o *outbox) push(st *chanState, ref *buffer.Chunk, data []byte, kind router.Kind, anyOne bool) {
	o.pushRun(st, ref, data, 1, kind, anyOne)
}

// pushRun queues count consecutive messages as one entry: data is the message itself if
// count is 1, or count messages each ended by kind's delimiter. The caller has retained
// ref once for the entry. The entry is filled in place, field by field: it is written
// once, into memory that has usually left the cache since its last use.
func (o *outbox) pushRun(st *chanState, ref *buffer.Chunk, data []byte, count int, kind router.Kind, anyOne bool) {
	m := o.q.add()
	m.seq, m.st, m.ref = o.nextSeq, st, ref
	m.ptr, m.n = unsafe.SliceData(data), uint32(len(data)) // at most MaxFrameBytes
	m.count, m.kind, m.anyOne = uint16(count), kind, anyOne
	o.nextSeq += uint64(count)
	st.bound.Add(len(data))
	o.unacked += len(data)
	if o.encoding && o.next == o.q.len()-1 && len(o.out) < maxOutBytes {
		o.encode(m)
		o.next++
	}
}

// fill encodes waiting messages into out while it holds less than maxOutBytes, if a
// session's writer is running.
func (o *outbox) fill() {
	if !o.encoding {
		return
	}
	q := o.q.items()
	for o.next < len(q) && len(o.out) < maxOutBytes {
		o.encode(&q[o.next])
		o.next++
	}
}

// encode appends m's frame to out: a DATA frame for a single message, a RUN frame for a
// run, or a DATA frame per message of the run for a receiver that reads no RUN frames.
func (o *outbox) encode(m *outMsg) {
	tail := m.st.tail[m.kind]
	switch {
	case m.count == 1:
		o.out = appendData(o.out, m.seq, tail, m.data())
	case o.runs:
		o.out = appendRun(o.out, m.seq, int(m.count), tail, m.data())
	default:
		seq := m.seq
		for msg := range buffer.Messages(m.data(), m.kind.Delimiter()) {
			o.out = appendData(o.out, seq, tail, msg)
			seq++
		}
	}
	o.outN += int(m.count)
	o.outSeq = m.last()
}

// startEncoding encodes, from the oldest, the messages queued, and later ones as they
// are queued, for a session whose writer is about to run; runs says its receiver reads
// RUN frames.
func (o *outbox) startEncoding(runs bool) {
	o.runs = runs
	o.next = 0
	o.out, o.outN = o.out[:0], 0
	o.encoding = true
	o.fill()
}

// stopEncoding discards what the ended session's writer did not take.
func (o *outbox) stopEncoding() {
	o.encoding = false
	o.out, o.outN = o.out[:0], 0
}

// take hands the writer the frames encoded so far and their count, and gives the
// encoders spare to fill next. The frames are marked sent before they are written: a
// failed write may still have reached the receiver.
func (o *outbox) take(spare []byte) ([]byte, int) {
	o.fill()
	buf, n := o.out, o.outN
	if n > 0 {
		o.out, o.outN = spare[:0], 0
		o.sentSeq = max(o.sentSeq, o.outSeq)
	}
	o.report()
	return buf, n
}

// report brings the gauge up to date.
func (o *outbox) report() {
	if d := o.unacked - o.reported; d != 0 {
		o.gauge.Add(float64(d))
		if o.peerGauge != nil {
			o.peerGauge.Set(float64(o.unacked))
		}
		o.reported = o.unacked
	}
}

// ack removes the messages up to and including seq.
func (o *outbox) ack(seq uint64) {
	q := o.q.items()
	// A search, not a subtraction: settling AnyOne lines on GOODBYE leaves gaps in q.
	k := sort.Search(len(q), func(i int) bool { return q[i].last() > seq })
	o.trim(k)
	if q = o.q.items(); len(q) > 0 && q[0].seq <= seq {
		// A receiver acknowledges whole runs, since it reads them whole; if one ever
		// acknowledged part of a run, the part stays queued so that a resumed link
		// sends the rest exactly once.
		o.cutFront(&q[0], int(seq-q[0].seq+1))
	}
}

// cutFront removes the first k messages of the run m (fewer than m.count).
func (o *outbox) cutFront(m *outMsg, k int) {
	data, cut, cutN := m.data(), 0, 0
	for msg := range buffer.Messages(data, m.kind.Delimiter()) {
		if cutN == k {
			break
		}
		cut += len(msg) + 1
		cutN++
	}
	rest := data[cut:]
	if int(m.count)-k == 1 {
		rest = rest[:len(rest)-1] // a single message holds no delimiter
	}
	freed := len(data) - len(rest)
	m.st.bound.Add(-freed)
	o.unacked -= freed
	m.ptr, m.n = unsafe.SliceData(rest), uint32(len(rest))
	m.seq += uint64(k)
	m.count -= uint16(k)
	o.report()
	o.space.Broadcast()
}

// trim removes the first k messages (acknowledged).
func (o *outbox) trim(k int) {
	if k == 0 {
		return
	}
	q := o.q.items()[:k]
	for i := range q {
		q[i].st.bound.Add(-q[i].size())
		o.unacked -= q[i].size()
	}
	for i := 0; i < k; {
		// One release per run of messages sharing a chunk.
		j := i + 1
		for j < k && q[j].ref == q[i].ref {
			j++
		}
		q[i].ref.Release(j - i)
		i = j
	}
	o.q.pop(k)
	o.next = max(o.next-k, 0)
	o.report()
	o.space.Broadcast()
}

// settle removes the messages that pick selects, which a receiver may have seen but
// will never acknowledge: AnyOne ones are returned for rerouting (copied out of their
// chunks), Broadcast ones are counted per channel in drops. The rest stay queued, in
// order. It is called only when nothing is being encoded.
func (o *outbox) settle(pick func(*outMsg) bool) (reroute []router.Message, drops map[string]int) {
	var keep fifo[outMsg]
	q := o.q.items()
	for i := range q {
		m := &q[i]
		if !pick(m) {
			keep.push(*m)
			continue
		}
		m.st.bound.Add(-m.size())
		o.unacked -= m.size()
		if m.anyOne {
			reroute = append(reroute, router.Message{Channel: m.st.name, Kind: m.kind, Data: append([]byte(nil), m.data()...)})
		} else {
			if drops == nil {
				drops = map[string]int{}
			}
			drops[m.st.name] += int(m.count)
		}
		m.ref.Release(1)
	}
	o.q = keep
	o.next = 0
	o.report()
	o.space.Broadcast()
	return reroute, drops
}

// maxResumeSeq bounds the lastSeq a link continues after, far beyond any real stream,
// so that sequence numbers cannot wrap.
const maxResumeSeq = 1 << 62

// renumber makes the queue continue after last. It is called before the link's first
// session, so no receiver has seen any of it (sentSeq is 0).
func (o *outbox) renumber(last uint64) error {
	if last > maxResumeSeq {
		return protocolError(ReasonLastSeq, "WELCOME lastSeq %d is beyond %d", last, uint64(maxResumeSeq))
	}
	q := o.q.items()
	next := last + 1
	for i := range q {
		q[i].seq = next
		next += uint64(q[i].count)
	}
	o.nextSeq = next
	o.sentSeq = last
	return nil
}

// maxOutBytes is how many bytes of frames are encoded ahead of the writer: enough for
// thousands of short lines per system call, while the link's two buffers stay small.
const maxOutBytes = 256 << 10
