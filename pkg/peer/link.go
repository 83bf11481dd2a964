package peer

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime/debug"
	"sort"
	"strconv"
	"sync"
	"time"
	"unsafe"

	"github.com/go-logr/logr"

	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/router"
)

// DefaultKeepalive is how often an idle link sends PING; a link that hears nothing for
// three intervals is considered dead.
const DefaultKeepalive = 2 * time.Second

// LinkConfig configures an outbound link.
type LinkConfig struct {
	// Self identifies this sidecar's incarnation in HELLO.
	Self Identity
	// Member is the receiving pod; the link dials Member.IP:Member.PeerPort.
	Member discovery.Member
	// LocalIP is the source address of the link, the pod IP the receiver checks.
	LocalIP string
	// Channels returns the channels this pod shares with the member, for HELLO.
	Channels  func() []string
	Router    *router.Router
	Log       logr.Logger
	Metrics   *Metrics
	Keepalive time.Duration
	// Secure, if set, secures the link's connections (mutual TLS) and verifies that the
	// receiver is Member.
	Secure Secure
}

// outMsg is a sequenced message waiting for its acknowledgement. The link keeps them by
// value in a fifo: queueing a line allocates nothing. A full queue of short lines holds
// tens of thousands of them, written once and read back at acknowledgement long after,
// so the struct is kept small (40 bytes): the channel name lives in st, and the
// message's bytes are a pointer and a length rather than a slice.
type outMsg struct {
	seq uint64
	st  *chanState
	// ref keeps the bytes' slab chunk; released when the message leaves the queue.
	ref    *router.Chunk
	ptr    *byte
	n      uint32
	kind   router.Kind
	anyOne bool
}

// data returns the message's bytes.
func (m *outMsg) data() []byte { return unsafe.Slice(m.ptr, m.n) }

// size returns the message's length.
func (m *outMsg) size() int { return int(m.n) }

// chanState is the link's bound on one channel: bytes queued and not yet acknowledged.
type chanState struct {
	name  string
	bytes int
	bound router.Bound
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

// Link carries lines from this sidecar to one member pod. It implements router.Remote.
//
// The link keeps every line until the receiver acknowledges it, in a queue bounded in
// bytes per channel; that queue is both the send queue and the retransmit queue. A
// session (one TCP connection) starts with HELLO/WELCOME, after which the link resumes
// after the receiver's last sequence number if the receiver is the same incarnation, or
// settles the lines the old incarnation may have seen (Broadcast: dropped
// peer_restarted; AnyOne: rerouted) if it is not.
type Link struct {
	cfg LinkConfig
	log logr.Logger

	mu sync.Mutex
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
	out      []byte
	// outN counts the frames in out; outSeq is the last one's sequence number.
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
	// unacked is the bytes queued; reported is what podipc_peer_unacked_bytes was told,
	// updated per written batch and per acknowledgement rather than per line.
	unacked, reported int
	space             router.Signal
	// peerInc is the receiver's incarnation from the last WELCOME (havePeer says there
	// was one).
	peerInc  uint64
	havePeer bool
	presence map[string]int
	up       bool
	conn     net.Conn
	// ended is closed when the current session ends (nil while none is up), so that
	// Shutdown waits for the receiver to close the link after GOODBYE.
	ended  chan struct{}
	closed bool
	// bye asks the writer to say GOODBYE once the queue is empty.
	bye bool

	wake   chan struct{}
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// NewLink returns a link that is not yet running.
func NewLink(cfg LinkConfig) *Link {
	if cfg.Keepalive == 0 {
		cfg.Keepalive = DefaultKeepalive
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	return &Link{
		cfg: cfg, log: cfg.Log.WithValues("peer", cfg.Member.Namespace+"/"+cfg.Member.Name, "peerUID", cfg.Member.UID),
		nextSeq: 1, chans: map[string]*chanState{}, presence: map[string]int{},
		wake: make(chan struct{}, 1),
	}
}

// ID returns the member's UID.
func (l *Link) ID() string { return l.cfg.Member.UID }

// Member returns the member the link dials.
func (l *Link) Member() discovery.Member { return l.cfg.Member }

// Presence reports the member's advertised connections on channel and whether the
// link is established.
func (l *Link) Presence(channel string) (int, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.presence[channel], l.up
}

// Send queues a message under the channel's overflow policy. Slow readers are
// judged where they are, by the receiving sidecar, so a link is more patient than a
// local queue: under WaitThenDrop and Disconnect it waits maxWait plus one keepalive
// interval, because the receiver may hold a slow reader's lines unacknowledged for up
// to maxWait (and pause its link that long while it judges a reader under
// Disconnect), and a drop here would hit every reader over there, fast or slow.
func (l *Link) Send(ctx context.Context, channel string, kind router.Kind, line router.Payload, anyOne bool, ov discovery.Overflow) (router.Result, string) {
	data := line.Data
	if ov.Policy != discovery.Block {
		ov.Policy = discovery.WaitThenDrop
		ov.MaxWait += l.cfg.Keepalive
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return router.Dropped, router.ReasonPeerRemoved
	}
	st := l.chanLocked(channel)
	res, reason := st.bound.Admit(ctx, &l.mu, len(data), func() int { return st.bytes }, &l.space,
		func() bool { return l.closed }, ov)
	if res != router.Queued {
		return res, reason
	}
	if l.closed {
		return router.Dropped, router.ReasonPeerRemoved
	}
	line.Ref.Retain(1)
	l.pushLocked(st, line.Ref, data, kind, anyOne)
	l.kickLocked()
	return router.Queued, ""
}

// pushLocked queues data as the next message in sequence, and encodes it for the writer
// if a session is up. The queue entry is filled in place, field by field: it is written
// once per line, into memory that has usually left the cache since its last use.
func (l *Link) pushLocked(st *chanState, ref *router.Chunk, data []byte, kind router.Kind, anyOne bool) {
	m := l.q.add()
	m.seq, m.st, m.ref = l.nextSeq, st, ref
	m.ptr, m.n = unsafe.SliceData(data), uint32(len(data)) // lines are at most MaxFrameBytes
	m.kind, m.anyOne = kind, anyOne
	l.nextSeq++
	st.bytes += len(data)
	l.unacked += len(data)
	if l.encoding && l.next == l.q.len()-1 && len(l.out) < maxOutBytes {
		l.encodeLocked(m)
		l.next++
	}
}

// fillLocked encodes waiting messages into out while it holds less than maxOutBytes.
func (l *Link) fillLocked() {
	q := l.q.items()
	for l.next < len(q) && len(l.out) < maxOutBytes {
		l.encodeLocked(&q[l.next])
		l.next++
	}
}

// encodeLocked appends m's DATA frame to out.
func (l *Link) encodeLocked(m *outMsg) {
	l.out = AppendDataHeader(l.out, m.seq, m.st.name, m.kind, m.size())
	l.out = append(l.out, m.data()...)
	l.outN++
	l.outSeq = m.seq
}

// startEncodingLocked encodes the messages not yet handed to the writer, and later ones
// as they are queued, for a session whose writer is about to run.
func (l *Link) startEncodingLocked() {
	l.out, l.outN = l.out[:0], 0
	l.encoding = true
	l.fillLocked()
}

// stopEncodingLocked discards what the ended session's writer did not take.
func (l *Link) stopEncodingLocked() {
	l.encoding = false
	l.out, l.outN = l.out[:0], 0
}

// chanLocked returns the bound of channel.
func (l *Link) chanLocked(channel string) *chanState {
	if l.last != nil && channel == l.lastName {
		return l.last
	}
	st := l.chans[channel]
	if st == nil {
		st = &chanState{name: channel}
		l.chans[channel] = st
	}
	l.lastName, l.last = channel, st
	return st
}

// reportLocked brings podipc_peer_unacked_bytes up to date.
func (l *Link) reportLocked() {
	if d := l.unacked - l.reported; d != 0 {
		l.cfg.Metrics.Unacked.Add(float64(d))
		l.reported = l.unacked
	}
}

// SendBatch queues Broadcast lines of one channel in order, as Send does for each, with
// one lock and one wakeup of the writer per batch. It stops at the first line that is
// not queued and returns its index with the result and reason.
func (l *Link) SendBatch(ctx context.Context, channel string, kind router.Kind, lines []router.Payload, ov discovery.Overflow) (n int, res router.Result, reason string) {
	// Every line's chunk is retained before the writer can see it (one atomic
	// operation per chunk), and what was not queued is released on the way out.
	router.RetainLines(lines)
	defer func() { router.ReleaseLines(lines[n:]) }()
	if ov.Policy != discovery.Block {
		ov.Policy = discovery.WaitThenDrop
		ov.MaxWait += l.cfg.Keepalive
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	st := l.chanLocked(channel)
	used := func() int { return st.bytes }
	closed := func() bool { return l.closed }
	added := false
	for i, line := range lines {
		d := line.Data
		if l.closed {
			return i, router.Dropped, router.ReasonPeerRemoved
		}
		if added && st.bytes != 0 && st.bytes+len(d) > ov.QueueBytes {
			// Admit may wait for acknowledgements: let the writer send what is queued.
			l.kickLocked()
		}
		if !st.bound.Fits(st.bytes, len(d), ov.QueueBytes) {
			res, reason = st.bound.Admit(ctx, &l.mu, len(d), used, &l.space, closed, ov)
			if res != router.Queued {
				l.kickLocked()
				return i, res, reason
			}
			if l.closed {
				return i, router.Dropped, router.ReasonPeerRemoved
			}
		}
		l.pushLocked(st, line.Ref, d, kind, false)
		added = true
	}
	l.kickLocked()
	return len(lines), router.Queued, ""
}

// kickLocked wakes the writer.
func (l *Link) kickLocked() { wake(l.wake) }

// trimLocked removes the first k messages of q (acknowledged or settled).
func (l *Link) trimLocked(k int) {
	if k == 0 {
		return
	}
	q := l.q.items()[:k]
	for i := range q {
		q[i].st.bytes -= q[i].size()
		l.unacked -= q[i].size()
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
	l.q.pop(k)
	l.next = max(l.next-k, 0)
	l.reportLocked()
	l.space.Broadcast()
}

// ackLocked removes messages up to and including seq.
func (l *Link) ackLocked(seq uint64) {
	q := l.q.items()
	// A search, not a subtraction: settling AnyOne lines on GOODBYE leaves gaps in q.
	k := sort.Search(len(q), func(i int) bool { return q[i].seq > seq })
	l.trimLocked(k)
}

// settleLocked removes the messages with seq ≤ upTo (all of them if upTo is max) that a
// receiver may have seen but will never acknowledge: Broadcast ones are counted dropped
// for reason, AnyOne ones are returned for rerouting. Messages that no receiver has seen
// stay queued. It is called only between sessions, when nothing is being encoded.
func (l *Link) settleLocked(upTo uint64, reason string) []router.Message {
	var reroute []router.Message
	drops := map[string]int{}
	var keep fifo[outMsg]
	for _, m := range l.q.items() {
		if m.seq > upTo {
			keep.push(m)
			continue
		}
		m.st.bytes -= m.size()
		l.unacked -= m.size()
		if m.anyOne {
			// Rerouted lines leave the chunk, which is released below.
			reroute = append(reroute, router.Message{Channel: m.st.name, Kind: m.kind, Data: append([]byte(nil), m.data()...)})
		} else {
			drops[m.st.name]++
		}
		m.ref.Release(1)
	}
	l.q = keep
	l.next = 0
	l.reportLocked()
	for ch, c := range drops {
		l.cfg.Router.Drop(ch, reason, c)
		l.log.Info("Dropped unacknowledged lines", "channel", ch, "reason", reason, "count", c)
	}
	l.space.Broadcast()
	return reroute
}

// Start runs the link until ctx ends or Shutdown or Close is called: it dials, resumes
// and redials with backoff. Lines still queued when ctx ends stay queued for Shutdown
// or Close to settle. A link that was closed returns net.ErrClosed.
func (l *Link) Start(ctx context.Context) error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return net.ErrClosed
	}
	if l.ctx != nil {
		l.mu.Unlock()
		return errors.New("peer: link already started")
	}
	l.ctx, l.cancel = context.WithCancel(ctx)
	l.wg.Add(1)
	l.mu.Unlock()
	defer l.wg.Done()
	l.run()
	return nil
}

func (l *Link) run() {
	ctx := l.ctx
	backoff := 50 * time.Millisecond
	first := true
	for ctx.Err() == nil {
		if !first {
			l.cfg.Metrics.Reconnects.Inc()
		}
		first = false
		err := l.guardedSession(ctx)
		l.mu.Lock()
		bye := l.bye
		l.mu.Unlock()
		if ctx.Err() != nil || bye {
			return
		}
		if errors.Is(err, errGoodbye) {
			l.log.Info("Peer said goodbye")
		} else {
			l.log.V(1).Info("Peer link ended", "err", err)
		}
		if err == nil || errors.Is(err, errEstablished) {
			backoff = 50 * time.Millisecond
		}
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}

// guardedSession runs a session as the last line of defence against what the receiver
// sends: a panic is counted, logged and ends only this session (it is still a bug). A
// protocol violation by the receiver is counted and logged.
func (l *Link) guardedSession(ctx context.Context) (err error) {
	var conn net.Conn
	defer func() {
		if r := recover(); r != nil {
			l.mu.Lock()
			conn = l.conn
			l.endSessionLocked()
			l.mu.Unlock()
			if conn != nil {
				recovered(l.cfg.Metrics, l.log, "out", conn, r)
			} else {
				l.cfg.Metrics.Panics.WithLabelValues("out").Inc()
				l.log.Error(fmt.Errorf("panic: %v", r), "Peer link goroutine panicked", "stack", string(debug.Stack()))
			}
			err = fmt.Errorf("panic: %v", r)
		}
	}()
	err = l.session(ctx)
	var pe *ProtocolError
	if errors.As(err, &pe) {
		l.cfg.Metrics.ProtocolErrors.WithLabelValues("out", pe.Reason).Inc()
		l.log.Info("Closed peer link: protocol error", "reason", pe.Reason, "detail", pe.Detail)
	}
	return err
}

var (
	errGoodbye     = errors.New("peer said goodbye")
	errEstablished = errors.New("session was established")
)

// session runs one connection: dial, handshake, then write and read until it fails.
func (l *Link) session(ctx context.Context) error {
	l.cfg.Metrics.Links.WithLabelValues("out", "connecting").Inc()
	d := net.Dialer{Timeout: 5 * time.Second, KeepAlive: -1}
	if l.cfg.LocalIP != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(l.cfg.LocalIP)}
	}
	addr := net.JoinHostPort(l.cfg.Member.IP, strconv.Itoa(l.cfg.Member.PeerPort))
	dial := func(ctx context.Context) (net.Conn, error) { return d.DialContext(ctx, "tcp", addr) }
	var conn net.Conn
	var err error
	if l.cfg.Secure != nil {
		conn, err = l.cfg.Secure.Dial(ctx, dial, l.cfg.Member)
	} else {
		conn, err = dial(ctx)
	}
	if err != nil {
		l.cfg.Metrics.Links.WithLabelValues("out", "connecting").Dec()
		return err
	}
	defer func() { _ = conn.Close() }()
	w, fr, err := l.handshake(conn)
	l.cfg.Metrics.Links.WithLabelValues("out", "connecting").Dec()
	if err != nil {
		return err
	}
	defer fr.Close()
	if err := l.resume(conn, w); err != nil {
		return err
	}
	l.cfg.Metrics.Links.WithLabelValues("out", "up").Inc()
	defer l.cfg.Metrics.Links.WithLabelValues("out", "up").Dec()

	done := make(chan struct{})
	werr := make(chan error, 1)
	go func() {
		var err error
		defer func() { werr <- err }()
		defer func() {
			if r := recover(); r != nil {
				recovered(l.cfg.Metrics, l.log, "out", conn, r)
				err = fmt.Errorf("panic: %v", r)
			}
		}()
		err = l.writeLoop(conn, done)
		if err != nil {
			_ = conn.Close() // unblocks readLoop
		}
	}()
	rerr := l.readLoop(fr)
	close(done)
	_ = conn.Close()
	wErr := <-werr
	l.mu.Lock()
	l.endSessionLocked()
	var reroute []router.Message
	if errors.Is(rerr, errGoodbye) {
		// The receiver is going away and will not acknowledge more: AnyOne lines go to
		// another candidate now rather than wait for it.
		reroute = l.settleAnyOneLocked()
	}
	l.mu.Unlock()
	l.cfg.Router.Reroute(reroute)
	l.cfg.Router.Notify()
	if rerr == nil {
		rerr = wErr
	}
	return errors.Join(errEstablished, rerr)
}

// settleAnyOneLocked removes every unacknowledged AnyOne line for rerouting.
func (l *Link) settleAnyOneLocked() []router.Message {
	var out []router.Message
	var keep fifo[outMsg]
	for _, m := range l.q.items() {
		if m.anyOne {
			out = append(out, router.Message{Channel: m.st.name, Kind: m.kind, Data: append([]byte(nil), m.data()...)})
			m.st.bytes -= m.size()
			l.unacked -= m.size()
			m.ref.Release(1)
		} else {
			keep.push(m)
		}
	}
	l.q = keep
	l.next = 0
	l.reportLocked()
	l.space.Broadcast()
	return out
}

// handshake sends HELLO and reads WELCOME.
func (l *Link) handshake(conn net.Conn) (Welcome, *Reader, error) {
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	h := Hello{MinVersion: MinVersion, MaxVersion: Version, Pod: l.cfg.Self, Channels: l.cfg.Channels()}
	if _, err := conn.Write(h.Frame()); err != nil {
		return Welcome{}, nil, err
	}
	t, body, err := ReadHandshake(conn, maxHandshakeBytes)
	if err != nil {
		return Welcome{}, nil, err
	}
	switch t {
	case FrameRefuse:
		reason, _ := ParseReason(body)
		l.log.Info("Peer refused the link", "reason", reason)
		return Welcome{}, nil, fmt.Errorf("refused: %s", reason)
	case FrameWelcome:
	default:
		return Welcome{}, nil, fmt.Errorf("%w: expected WELCOME, got type %d", ErrFrame, t)
	}
	w, err := ParseWelcome(body)
	if err != nil {
		return Welcome{}, nil, err
	}
	if w.Version < MinVersion || w.Version > Version {
		return Welcome{}, nil, fmt.Errorf("peer chose unsupported protocol version %d", w.Version)
	}
	if w.Pod.UID != l.cfg.Member.UID {
		return Welcome{}, nil, fmt.Errorf("peer is pod UID %q, expected %q", w.Pod.UID, l.cfg.Member.UID)
	}
	_ = conn.SetDeadline(time.Time{})
	// The receiver sends ACK, PRESENCE, PING and GOODBYE, never a message.
	fr := NewReader(conn, maxHandshakeBytes)
	fr.SetReadTimeout(conn, 3*l.cfg.Keepalive)
	return w, fr, nil
}

// resume applies WELCOME to the queue: same receiver incarnation → continue after its
// last sequence number (exactly once); another incarnation → settle what it may have
// seen. A lastSeq beyond what this link sent that receiver is a protocol error: it
// would settle lines the receiver never saw.
func (l *Link) resume(conn net.Conn, w Welcome) error {
	l.mu.Lock()
	var reroute []router.Message
	switch {
	case w.Known && l.havePeer && l.peerInc == w.Pod.Incarnation:
		if w.LastSeq > l.sentSeq {
			l.mu.Unlock()
			return protocolError(ReasonLastSeq, "WELCOME lastSeq %d, but the highest sequence number sent is %d", w.LastSeq, l.sentSeq)
		}
		l.ackLocked(w.LastSeq)
	case w.Known && !l.havePeer:
		// First contact of this link, and the receiver remembers this sidecar's
		// incarnation from an earlier link (the member left and came back): nothing it
		// saw is in this queue, so the queue continues its numbering rather than be
		// acknowledged by it.
		if err := l.renumberLocked(w.LastSeq); err != nil {
			l.mu.Unlock()
			return err
		}
	case l.havePeer:
		if l.peerInc == w.Pod.Incarnation {
			// The same receiver no longer knows this sender: it forgot the resume state
			// when this pod left its channels. What it may have seen is settled as for
			// a restart.
			l.log.Info("Peer forgot this link's resume state", "incarnation", w.Pod.Incarnation)
		} else {
			l.log.Info("Peer restarted", "oldIncarnation", l.peerInc, "incarnation", w.Pod.Incarnation)
		}
		reroute = l.settleLocked(l.sentSeq, router.ReasonPeerRestarted)
	}
	l.next = 0
	l.startEncodingLocked()
	l.havePeer, l.peerInc = true, w.Pod.Incarnation
	l.presence = w.Presence
	l.up = true
	l.conn = conn
	l.ended = make(chan struct{})
	l.kickLocked()
	l.mu.Unlock()
	l.log.V(1).Info("Peer link established", "version", w.Version, "incarnation", w.Pod.Incarnation)
	l.cfg.Router.Reroute(reroute)
	l.cfg.Router.Notify()
	return nil
}

// maxResumeSeq bounds the lastSeq a link continues after, far beyond any real stream,
// so that sequence numbers cannot wrap.
const maxResumeSeq = 1 << 62

// renumberLocked makes the queue continue after last. It is called before the link's
// first session, so no receiver has seen any of it (sentSeq is 0).
func (l *Link) renumberLocked(last uint64) error {
	if last > maxResumeSeq {
		return protocolError(ReasonLastSeq, "WELCOME lastSeq %d is beyond %d", last, uint64(maxResumeSeq))
	}
	q := l.q.items()
	for i := range q {
		q[i].seq = last + 1 + uint64(i)
	}
	l.nextSeq = last + 1 + uint64(len(q))
	l.sentSeq = last
	return nil
}

// writeLoop is the link's only writer: it writes the frames encoded since its last
// write in one system call per wakeup, pings when idle, and says GOODBYE when asked to
// once the queue is empty.
func (l *Link) writeLoop(conn net.Conn, done <-chan struct{}) error {
	ping := time.NewTicker(l.cfg.Keepalive)
	defer ping.Stop()
	// spare is the buffer written last time, swapped in for the encoders to fill next.
	var spare []byte
	wrote := false
	for {
		l.mu.Lock()
		l.fillLocked()
		buf, n := l.out, l.outN
		if n > 0 {
			l.out, l.outN = spare[:0], 0
			// Marked before the write: a failed write may still have reached the receiver.
			l.sentSeq = max(l.sentSeq, l.outSeq)
		}
		bye := l.bye && l.q.len() == 0
		l.reportLocked()
		l.mu.Unlock()
		if n > 0 {
			_ = conn.SetWriteDeadline(time.Now().Add(3 * l.cfg.Keepalive))
			if _, err := conn.Write(buf); err != nil {
				return err
			}
			l.cfg.Metrics.Sent.Add(float64(n))
			// Keep the buffer for the next swap unless a single large message grew it.
			spare = nil
			if cap(buf) <= 2*maxOutBytes {
				spare = buf
			}
			wrote = true
			continue
		}
		if bye {
			_ = conn.SetWriteDeadline(time.Now().Add(3 * l.cfg.Keepalive))
			_, err := conn.Write(ReasonFrame(FrameGoodbye, "shutdown"))
			return err
		}
		select {
		case <-l.wake:
		case <-done:
			return nil
		case <-ping.C:
			if !wrote {
				_ = conn.SetWriteDeadline(time.Now().Add(3 * l.cfg.Keepalive))
				if _, err := conn.Write(PingFrame()); err != nil {
					return err
				}
			}
			wrote = false
		}
	}
}

// maxOutBytes is how many bytes of frames are encoded ahead of the writer: enough for
// thousands of short lines per system call, while the link's two buffers stay small.
const maxOutBytes = 256 << 10

// readLoop reads ACK, PRESENCE, PING and GOODBYE until the connection fails.
func (l *Link) readLoop(fr *Reader) error {
	for {
		t, body, err := fr.Next() // the read deadline is refreshed per socket read
		if err != nil {
			return err
		}
		switch t {
		case FrameAck:
			seq, err := ParseAck(body)
			if err != nil {
				return err
			}
			l.mu.Lock()
			sent := l.sentSeq
			if seq <= sent {
				l.ackLocked(seq)
			}
			l.mu.Unlock()
			if seq > sent {
				// Acknowledging what was never sent would settle lines nobody received.
				return protocolError(ReasonAck, "ACK %d, but the highest sequence number sent is %d", seq, sent)
			}
		case FramePresence:
			p, err := ParsePresence(body)
			if err != nil {
				return err
			}
			l.mu.Lock()
			l.presence = p
			l.mu.Unlock()
			l.cfg.Router.Notify()
		case FrameGoodbye:
			return errGoodbye
		default: // PING, and frames of later versions, are skipped
		}
	}
}

// Reset aborts the current connection with a TCP reset (for tests); the link redials
// and resumes.
func (l *Link) Reset() {
	l.mu.Lock()
	c := l.conn
	l.mu.Unlock()
	abort(c)
}

// abort closes c with a TCP reset instead of an orderly FIN, as a crash or a network
// fault would end it.
func abort(c net.Conn) {
	for {
		sc, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			break
		}
		c = sc.NetConn() // a TLS session (or a wrapper): reset its TCP connection
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
		_ = tc.Close()
	}
}

// endSessionLocked records that the session has ended.
func (l *Link) endSessionLocked() {
	l.up, l.conn = false, nil
	l.stopEncodingLocked()
	if l.ended != nil {
		close(l.ended)
		l.ended = nil
	}
}

// goodbyeGrace bounds how long Shutdown waits for the receiver to close the link after
// GOODBYE.
const goodbyeGrace = time.Second

// Shutdown waits until every queued line is acknowledged or ctx ends; says GOODBYE
// once the queue is empty, and waits (within ctx, and at most goodbyeGrace) for the
// receiver to close the link; then closes the link. Lines still unacknowledged are
// counted dropped for reason shutdown, AnyOne ones too: the pod is going away, and so
// is the router that would reroute them. It returns ctx.Err() if lines were left.
func (l *Link) Shutdown(ctx context.Context) error {
	l.mu.Lock()
	for l.q.len() > 0 && ctx.Err() == nil {
		c := l.space.C()
		l.mu.Unlock()
		select {
		case <-c:
		case <-ctx.Done():
		}
		l.mu.Lock()
	}
	left := l.q.len() > 0
	l.bye = true
	ended := l.ended
	l.mu.Unlock()
	wake(l.wake)
	if ended != nil && !left {
		t := time.NewTimer(goodbyeGrace)
		select {
		case <-ended:
		case <-t.C:
		case <-ctx.Done():
		}
		t.Stop()
	}
	l.close(router.ReasonShutdown)
	if left {
		return ctx.Err()
	}
	return nil
}

// Close ends the link at once, as when its member leaves the channel, and joins its
// goroutines. Unacknowledged lines are settled: Broadcast ones counted dropped for
// reason peer_removed, AnyOne ones rerouted to another candidate. Idempotent.
func (l *Link) Close() error {
	l.close(router.ReasonPeerRemoved)
	return nil
}

// close stops the link, joins its goroutines and settles what is unacknowledged for
// reason. Only the first call settles.
func (l *Link) close(reason string) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		l.wg.Wait()
		return
	}
	l.closed = true
	if l.cancel != nil {
		l.cancel()
	}
	if l.conn != nil {
		_ = l.conn.Close()
	}
	l.mu.Unlock()
	l.wg.Wait()
	l.mu.Lock()
	reroute := l.settleLocked(^uint64(0), reason)
	l.mu.Unlock()
	if reason != router.ReasonShutdown {
		l.cfg.Router.Reroute(reroute)
	} else {
		for _, m := range reroute {
			l.cfg.Router.Drop(m.Channel, reason, 1)
		}
	}
	l.cfg.Router.Notify()
}
