package peer

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/go-logr/logr"

	"github.com/podipc/podipc/pkg/router"
)

// ServerConfig configures the inbound side of peer links.
type ServerConfig struct {
	// Self identifies this sidecar's incarnation in WELCOME.
	Self   Identity
	Router *router.Router
	// Authorize returns "" if a peer presenting id from remoteIP is a current member of
	// a channel this pod serves, with exactly that namespace, name, UID and IP, and the
	// reason it is refused otherwise.
	Authorize func(id Identity, remoteIP string) string
	Log       logr.Logger
	Metrics   *Metrics
	Keepalive time.Duration
	// Secure, if set, secures every accepted connection before HELLO is read (mutual
	// TLS), and HELLO must then claim the identity the connection proved.
	Secure Secure
}

// Server accepts peer links, delivers their lines to the router, and answers with
// cumulative acknowledgements, presence updates and keepalives.
type Server struct {
	cfg ServerConfig
	ln  net.Listener

	mu sync.Mutex
	// senders holds, per sending pod UID, the resume state of its latest incarnation;
	// it outlives connections so that a reset link resumes exactly once. An entry is
	// freed when its incarnation says GOODBYE, or when the pod is no longer authorized
	// (no longer a member of a shared channel) and has no connection: a pod killed
	// without GOODBYE that never returns must not keep its entry forever.
	senders map[string]*sender
	inbound map[*inbound]struct{}
	closed  bool

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// sender is the receive state for one sending pod's incarnation.
type sender struct {
	mu          sync.Mutex
	incarnation uint64
	// started says a line was received; last is then its sequence number.
	started bool
	last    uint64
	// pending are the dispatched lines not yet written everywhere, in sequence order.
	pending []pending
	notify  chan struct{}
	// active is the connection currently serving this sender (guarded by Server.mu).
	active *inbound
	// id and ip are the identity and source address of the sender's latest
	// connection (guarded by Server.mu), with which Revalidate asks whether it is
	// still authorized once it is disconnected.
	id Identity
	ip string
}

// pending is a dispatched line. Its acknowledgement waits for c, but never past
// deadline: a receiving sidecar does not withhold acknowledgements because a local
// reader is slow (DESIGN §5), so a line still queued for a reader after the channel's
// maxWait is acknowledged anyway.
type pending struct {
	// first and seq are the first and last sequence numbers of a batch of lines.
	first, seq uint64
	c          *router.Completion
	deadline   time.Time
}

// inbound is one accepted connection.
type inbound struct {
	conn net.Conn
	id   Identity
	ip   string
	bye  chan struct{} // closed to make the writer say GOODBYE
	done chan struct{} // closed when the connection's goroutines have ended
}

// NewServer returns a server for the listener ln (bound by the caller so that
// readiness can wait for it).
func NewServer(ln net.Listener, cfg ServerConfig) *Server {
	if cfg.Keepalive == 0 {
		cfg.Keepalive = DefaultKeepalive
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	return &Server{cfg: cfg, ln: ln, senders: map[string]*sender{}, inbound: map[*inbound]struct{}{}}
}

// Start accepts links until ctx ends or Close is called.
func (s *Server) Start(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return net.ErrClosed
	}
	s.ctx, s.cancel = context.WithCancel(ctx)
	s.wg.Add(2)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		<-s.ctx.Done()
		_ = s.ln.Close()
	}()
	go func() {
		defer s.wg.Done()
		for {
			conn, err := s.ln.Accept()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					s.cfg.Log.Error(err, "Peer listener failed")
				}
				return
			}
			s.mu.Lock()
			if s.closed {
				s.mu.Unlock()
				_ = conn.Close()
				return
			}
			in := &inbound{conn: conn, bye: make(chan struct{}), done: make(chan struct{})}
			s.inbound[in] = struct{}{}
			s.wg.Add(1)
			s.mu.Unlock()
			go func() {
				defer s.wg.Done()
				defer func() {
					s.mu.Lock()
					delete(s.inbound, in)
					s.mu.Unlock()
				}()
				defer close(in.done)
				defer func() { _ = conn.Close() }()
				if err := s.serve(in); err != nil && !errors.Is(err, net.ErrClosed) {
					s.cfg.Log.V(1).Info("Inbound peer link ended", "remote", conn.RemoteAddr().String(), "err", err)
				}
			}()
		}
	}()
	return nil
}

func (s *Server) refuse(in *inbound, label, reason string) error {
	s.cfg.Metrics.Refused.WithLabelValues(label).Inc()
	s.cfg.Log.Info("Refused peer link", "remote", in.conn.RemoteAddr().String(),
		"pod", in.id.Namespace+"/"+in.id.Name, "uid", in.id.UID, "reason", reason)
	_, _ = in.conn.Write(ReasonFrame(FrameRefuse, reason))
	return fmt.Errorf("refused: %s", reason)
}

// secure runs cfg.Secure on in and makes in speak over the secured connection. It
// returns the check of the identity HELLO claims (nil if none was proved).
func (s *Server) secure(in *inbound) (func(Identity) string, error) {
	conn, check, err := s.cfg.Secure.Accept(in.conn)
	var r *Refusal
	if errors.As(err, &r) {
		if r.Tell {
			return nil, s.refuse(in, r.Reason, r.Err.Error())
		}
		s.cfg.Metrics.Refused.WithLabelValues(r.Reason).Inc()
		s.cfg.Log.Info("Refused peer link", "remote", in.conn.RemoteAddr().String(), "reason", r.Reason, "err", r.Err.Error())
	}
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	in.conn = conn
	s.mu.Unlock()
	return check, nil
}

// serve runs one inbound connection: handshake, then read DATA until it ends.
func (s *Server) serve(in *inbound) error {
	_ = in.conn.SetDeadline(time.Now().Add(10 * time.Second))
	var check func(Identity) string
	if s.cfg.Secure != nil {
		var err error
		if check, err = s.secure(in); err != nil {
			return err
		}
	}
	conn := in.conn
	fr := NewReader(conn, maxHandshakeBytes)
	defer fr.Close()
	t, body, err := fr.Next()
	if err != nil {
		return err
	}
	if t != FrameHello {
		return s.refuse(in, "handshake", fmt.Sprintf("expected HELLO, got frame type %d", t))
	}
	h, err := ParseHello(body)
	if err != nil {
		return s.refuse(in, "handshake", err.Error())
	}
	// Revalidate reads the identity under s.mu: one it has not seen yet is
	// authorized below against the membership Revalidate was called for.
	s.mu.Lock()
	in.id = h.Pod
	if tcp, ok := conn.RemoteAddr().(*net.TCPAddr); ok {
		in.ip = tcp.IP.String()
	}
	s.mu.Unlock()
	v := min(h.MaxVersion, Version)
	if v < max(h.MinVersion, MinVersion) {
		return s.refuse(in, "version", fmt.Sprintf("no common protocol version: peer speaks %d-%d, this sidecar %d-%d",
			h.MinVersion, h.MaxVersion, MinVersion, Version))
	}
	if check != nil {
		if reason := check(h.Pod); reason != "" {
			return s.refuse(in, "identity", reason)
		}
	}
	if reason := s.cfg.Authorize(h.Pod, in.ip); reason != "" {
		return s.refuse(in, "unauthorized", reason)
	}
	st := s.takeOver(in)
	if st == nil {
		return net.ErrClosed
	}
	defer func() {
		s.mu.Lock()
		if st.active == in {
			st.active = nil
			// Revalidate closed this connection because the pod left every shared
			// channel (or it left while the link was down): its state is not needed.
			if reason := s.cfg.Authorize(in.id, in.ip); reason != "" {
				s.forgetLocked(st, reason)
			}
		}
		s.mu.Unlock()
	}()
	st.mu.Lock()
	w := Welcome{Version: v, Pod: s.cfg.Self}
	if st.incarnation == h.Pod.Incarnation {
		w.Known, w.LastSeq = true, st.last
	} else {
		st.incarnation, st.started, st.last, st.pending = h.Pod.Incarnation, false, 0, nil
	}
	st.mu.Unlock()
	w.Presence = s.cfg.Router.Presence()
	if _, err := conn.Write(w.Frame()); err != nil {
		return err
	}
	_ = conn.SetDeadline(time.Time{})
	fr.SetMax(MaxFrameBytes)
	fr.SetReadTimeout(conn, 3*s.cfg.Keepalive)
	s.cfg.Log.V(1).Info("Accepted peer link", "pod", h.Pod.Namespace+"/"+h.Pod.Name, "version", v,
		"resumeAfter", w.LastSeq, "known", w.Known)
	s.cfg.Metrics.Links.WithLabelValues("in", "up").Inc()
	defer s.cfg.Metrics.Links.WithLabelValues("in", "up").Dec()

	readDone := make(chan struct{})
	werr := make(chan error, 1)
	go func() {
		err := s.writeLoop(in, st, readDone)
		if err != nil {
			_ = conn.Close()
		}
		werr <- err
	}()
	err = s.readLoop(st, fr)
	close(readDone)
	_ = conn.Close()
	if werrV := <-werr; werrV != nil {
		s.cfg.Log.V(4).Info("Inbound peer writer ended", "err", werrV.Error())
	}
	if errors.Is(err, errGoodbye) {
		// The sender's incarnation has ended: forget it.
		s.mu.Lock()
		s.forgetLocked(st, "goodbye")
		s.mu.Unlock()
		return nil
	}
	return err
}

// takeOver makes in the active connection of its sender, ending (and waiting for) the
// previous one, so that no two connections deliver for one sender at once.
func (s *Server) takeOver(in *inbound) *sender {
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		// Looked up again after every wait: the previous connection may have freed
		// the entry on its way out.
		st := s.senders[in.id.UID]
		if st == nil {
			st = &sender{notify: make(chan struct{}, 1)}
			s.senders[in.id.UID] = st
			s.cfg.Metrics.Senders.Set(float64(len(s.senders)))
		}
		if st.active == nil {
			st.active, st.id, st.ip = in, in.id, in.ip
			return st
		}
		old := st.active
		s.mu.Unlock()
		_ = old.conn.Close()
		<-old.done
		s.mu.Lock()
		if s.closed {
			return nil
		}
	}
}

// forgetLocked frees the resume state st, unless a newer entry has replaced it. The
// caller holds s.mu.
func (s *Server) forgetLocked(st *sender, reason string) {
	if s.senders[st.id.UID] != st {
		return
	}
	delete(s.senders, st.id.UID)
	s.cfg.Metrics.Senders.Set(float64(len(s.senders)))
	s.cfg.Log.V(1).Info("Forgot peer's resume state", "pod", st.id.Namespace+"/"+st.id.Name, "uid", st.id.UID, "reason", reason)
}

// readLoop dispatches DATA frames in sequence order, skipping duplicates.
//
// Frames are dispatched in batches: the frames already buffered (up to maxBatch) share
// one completion and one pending entry, runs of one channel go to the router in one
// call, and the batch is closed before the loop could block on the socket, so no line
// waits for a later one to arrive.
//
// Lines are queued in place, in the reader's chunk. Because a batch ends before the
// reader could read from the socket again, every line of a batch lives in the chunk the
// reader holds until then (or in a buffer of its own): the queues take their own
// references, and the batch needs none.
func (s *Server) readLoop(st *sender, fr *Reader) error {
	b := batch{s: s, st: st}
	st.mu.Lock()
	b.started, b.last = st.started, st.last
	st.mu.Unlock()
	defer b.end()
	for {
		if !fr.Ready() || b.n >= maxBatch {
			b.end()
		}
		t, body, err := fr.Next() // the read deadline is refreshed per socket read
		if err != nil {
			return err
		}
		switch t {
		case FrameData:
		case FrameGoodbye:
			return errGoodbye
		default: // PING and frames of later versions
			continue
		}
		d, err := ParseData(body)
		if err != nil {
			return err
		}
		if b.started && d.Seq <= b.last {
			continue // a retransmission of a line already delivered
		}
		if b.started && d.Seq != b.last+1 {
			return fmt.Errorf("%w: sequence gap: got %d after %d", ErrFrame, d.Seq, b.last)
		}
		b.add(d, fr.Chunk())
	}
}

// maxBatch bounds the lines dispatched under one completion, so that acknowledgements
// keep flowing while a long buffered stream is dispatched.
const maxBatch = 1024

// batch is the lines dispatched by a read loop since its last blocking read.
type batch struct {
	s  *Server
	st *sender
	// started and last mirror st.started and st.last for the lines dispatched so far;
	// st is updated when the batch ends, together with its pending entry, so that an
	// acknowledgement never covers a line that is not yet queued.
	started bool
	last    uint64
	n       int
	first   uint64
	c       *router.Completion
	grace   time.Duration
	names   map[string]string
	// run holds consecutive lines of one channel and kind, not yet handed over.
	run     []router.Payload
	runName string
	runKind router.Kind
}

// add dispatches d, whose payload lives in chunk, as part of the batch.
func (b *batch) add(d Data, chunk *router.Chunk) {
	if b.c == nil {
		b.c = router.NewCompletion(b.st.notify)
		b.first = d.Seq
	}
	if len(b.run) > 0 && (string(d.Channel) != b.runName || d.Kind != b.runKind) {
		b.flushRun()
	}
	if len(b.run) == 0 {
		name, ok := b.names[string(d.Channel)]
		if !ok {
			if b.names == nil {
				b.names = map[string]string{}
			}
			name = string(d.Channel)
			b.names[name] = name
		}
		b.runName, b.runKind = name, d.Kind
	}
	b.run = append(b.run, router.Payload{Data: d.Payload, Ref: chunk})
	b.started, b.last = true, d.Seq
	b.n++
}

// flushRun hands the current run to the router.
func (b *batch) flushRun() {
	if len(b.run) == 0 {
		return
	}
	b.grace = max(b.grace, b.s.cfg.Router.DeliverBatch(b.s.ctx, b.runName, b.runKind, b.run, b.c))
	clear(b.run)
	b.run = b.run[:0]
}

// end hands over what is left and records the batch for acknowledgement. Its grace
// period starts once every line is queued (delivery may have waited under the
// overflow policy).
func (b *batch) end() {
	if b.c == nil {
		return
	}
	b.flushRun()
	b.st.mu.Lock()
	b.st.started, b.st.last = b.started, b.last
	b.st.pending = append(b.st.pending, pending{first: b.first, seq: b.last, c: b.c, deadline: time.Now().Add(b.grace)})
	b.st.mu.Unlock()
	if !b.c.Done() {
		// The writer learns of a batch only from its completion: wake it so that it
		// arms the grace timer for a batch a stalled reader holds up, which is then
		// acknowledged at its deadline, not at the next keepalive tick.
		select {
		case b.st.notify <- struct{}{}:
		default:
		}
	}
	b.s.cfg.Metrics.Received.Add(float64(b.n))
	b.c, b.n, b.grace = nil, 0, 0
}

// ackable pops the lines that are complete, or past their deadline, and returns the
// cumulative acknowledgement and the deadline of the oldest line left (zero if none).
func (st *sender) ackable(now time.Time) (uint64, time.Time) {
	st.mu.Lock()
	defer st.mu.Unlock()
	k := 0
	for k < len(st.pending) {
		p := st.pending[k]
		if !p.c.Complete() && (p.deadline.IsZero() || now.Before(p.deadline)) {
			break
		}
		k++
	}
	clear(st.pending[:k])
	st.pending = st.pending[k:]
	if len(st.pending) == 0 {
		return st.last, time.Time{}
	}
	return st.pending[0].first - 1, st.pending[0].deadline
}

// writeLoop is the connection's only writer: acknowledgements as lines complete,
// presence when local connections come and go, pings when idle, GOODBYE on shutdown.
func (s *Server) writeLoop(in *inbound, st *sender, readDone <-chan struct{}) error {
	bw := bufio.NewWriterSize(in.conn, 4<<10)
	ping := time.NewTicker(s.cfg.Keepalive)
	defer ping.Stop()
	presence := s.cfg.Router.PresenceChanged()
	var sentAck uint64
	var buf []byte
	wrote := false
	flush := func() error {
		_ = in.conn.SetWriteDeadline(time.Now().Add(3 * s.cfg.Keepalive))
		wrote = true
		return bw.Flush()
	}
	// grace fires at the oldest pending line's deadline.
	grace := time.NewTimer(time.Hour)
	defer grace.Stop()
	ack := func() error {
		a, next := st.ackable(time.Now())
		if !next.IsZero() {
			grace.Reset(max(time.Until(next), time.Millisecond))
		}
		if a > sentAck {
			sentAck = a
			buf = AckFrame(buf[:0], a)
			_, _ = bw.Write(buf)
			return flush()
		}
		return nil
	}
	if err := ack(); err != nil {
		return err
	}
	for {
		select {
		case <-st.notify:
			if err := ack(); err != nil {
				return err
			}
		case <-grace.C:
			if err := ack(); err != nil {
				return err
			}
		case <-presence:
			presence = s.cfg.Router.PresenceChanged()
			_, _ = bw.Write(PresenceFrame(s.cfg.Router.Presence()))
			if err := flush(); err != nil {
				return err
			}
		case <-ping.C:
			// A missed notification (taken by a previous connection's writer) is
			// caught here at the latest.
			if err := ack(); err != nil {
				return err
			}
			if !wrote {
				_, _ = bw.Write(PingFrame())
				if err := flush(); err != nil {
					return err
				}
			}
			wrote = false
		case <-in.bye:
			_ = ack()
			_, _ = bw.Write(ReasonFrame(FrameGoodbye, "shutdown"))
			return flush()
		case <-readDone:
			return nil
		}
	}
}

// Revalidate closes inbound links whose peer is no longer authorized, and frees the
// resume state of disconnected senders that are no longer authorized (called after a
// membership change). A disconnected sender that is still a member keeps its state, so
// that its reset link resumes exactly once; the state of one whose link is closed here
// is freed when that connection ends.
func (s *Server) Revalidate() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for in := range s.inbound {
		if in.id.UID == "" {
			continue // still in its handshake, which authorizes it
		}
		if reason := s.cfg.Authorize(in.id, in.ip); reason != "" {
			s.cfg.Log.Info("Closing peer link of a former member", "pod", in.id.Namespace+"/"+in.id.Name, "reason", reason)
			_ = in.conn.Close()
		}
	}
	for _, st := range s.senders {
		if st.active != nil {
			continue
		}
		if reason := s.cfg.Authorize(st.id, st.ip); reason != "" {
			s.forgetLocked(st, reason)
		}
	}
}

// Reset aborts every inbound connection with a TCP reset (for tests).
func (s *Server) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for in := range s.inbound {
		abort(in.conn)
	}
}

// Addr returns the listening address.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Close says goodbye on every inbound link (waiting at most timeout for the goodbyes
// to be written), stops accepting, and joins every goroutine. Idempotent.
func (s *Server) Close(timeout time.Duration) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.wg.Wait()
		return
	}
	s.closed = true
	_ = s.ln.Close()
	ins := make([]*inbound, 0, len(s.inbound))
	conns := make([]net.Conn, 0, len(s.inbound))
	for in := range s.inbound {
		ins = append(ins, in)
		conns = append(conns, in.conn) // read under s.mu: secure replaces it
		close(in.bye)
	}
	s.mu.Unlock()
	deadline := time.After(timeout)
	for i, in := range ins {
		select {
		case <-in.done:
		case <-deadline:
		case <-time.After(50 * time.Millisecond):
		}
		_ = conns[i].Close()
	}
	if s.cancel != nil {
		s.cancel()
	}
	s.wg.Wait()
}
