package peer

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/internal/wake"
	"github.com/podipc/podipc/pkg/ipc"
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
	// Shared returns the channels this pod shares with the member pod uid, as
	// discovery reports them: a link carries DATA only for those, and learns the
	// presence only of those. Nil shares none.
	Shared    func(uid string) []string
	Log       logr.Logger
	Metrics   *Metrics
	Keepalive time.Duration
	// MaxConnections and MaxConnectionsPerIP cap the connections open on the peer
	// port, authenticated or not, in all and from one source address; a connection
	// beyond either is closed at once (zero: DefaultMaxConnections,
	// DefaultMaxConnectionsPerIP).
	MaxConnections      int
	MaxConnectionsPerIP int
	// HandshakeTimeout bounds how long a connection may take to send HELLO and be
	// authenticated (zero: DefaultHandshakeTimeout).
	HandshakeTimeout time.Duration
	// Secure, if set, secures every accepted connection before HELLO is read (mutual
	// TLS), and HELLO must then claim the identity the connection proved.
	Secure Secure
	// ReceiveOnly returns those of Shared(uid) on which the member uid may only
	// receive, as the controller publishes them: its lines there are dropped, counted
	// as ReasonNotPermitted. Nil: every member may send. The link's identity (uid) is
	// the one its certificate proved under mutual TLS (Secure's check), so the decision
	// follows the certificate, not the HELLO's claim; it is taken once per link and again
	// on every Revalidate, never per line.
	ReceiveOnly func(uid string) []string
}

// Defaults of the peer port's connection bounds (docs/protocol.md, Bounds). A sidecar
// has one inbound link per member pod that sends to it; the global cap is a bound on
// memory (an idle connection costs a few KiB), the per-address one keeps a single
// address from taking every slot.
const (
	DefaultMaxConnections      = 1024
	DefaultMaxConnectionsPerIP = 8
	DefaultHandshakeTimeout    = 5 * time.Second
)

// Reasons of podipc_peer_refused_total: connections ended before authentication.
const (
	RefusedHandshake        = "handshake"         // not a well-formed HELLO
	RefusedVersion          = "version"           // no common protocol version
	RefusedUnauthorized     = "unauthorized"      // not a current member with this identity and IP
	RefusedConnectionLimit  = "connection_limit"  // MaxConnections were open
	RefusedSourceLimit      = "source_limit"      // MaxConnectionsPerIP were open from its address
	RefusedHandshakeTimeout = "handshake_timeout" // no HELLO within HandshakeTimeout
	RefusedIdentity         = "identity"          // HELLO claims another pod than its certificate proves
)

// ReasonNotShared counts DATA for a channel the two pods do not share (per this
// sidecar's discovery), as podipc_dropped_lines_total{reason}; the link goes on.
const ReasonNotShared = "not_shared"

// ReasonNotPermitted counts a line from a member that may only receive on its channel
// (Channel.spec.access.receiveOnly), as podipc_dropped_lines_total{reason}; the link goes
// on, and carries lines to that member as before.
const ReasonNotPermitted = "not_permitted"

// ReasonTooLarge counts a peer line longer than its channel's maxMessageBytes, as
// podipc_dropped_lines_total{reason}; the link goes on.
const ReasonTooLarge = "too_large"

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
	// perIP counts the open connections per source address, for MaxConnectionsPerIP.
	perIP map[string]int
	// started, closed and shutdown say Start, Close or Shutdown was called; shutdown
	// also says every link was asked to say GOODBYE.
	started, closed, shutdown bool
	// logs samples the logs of refusals and protocol errors, per reason, so that a
	// flood of bad connections cannot flood the log.
	logs sampledLogs

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
// reader is slow (docs/design.md §8.1), so a line still queued for a reader after the channel's
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
	// shared is what the link may carry; replaced by Revalidate when the membership
	// or a channel's spec changes, read by the link's goroutines.
	shared atomic.Pointer[sharedSet]
	// fr reads the link after its handshake (nil before; guarded by Server.mu), so
	// that Revalidate can move its frame bound.
	fr *Reader
	// presence wakes the writer to advertise presence again after shared changed.
	presence chan struct{}
}

// sharedSet is what one link may carry: the channels the two pods share and the
// frame bound that follows from their maxMessageBytes.
type sharedSet struct {
	channels map[string]sharedChannel
	maxFrame int
}

// sharedChannel is a channel a link may carry. name is the key itself, so the read
// loop can name a run of lines without converting the frame's bytes.
type sharedChannel struct {
	name            string
	maxMessageBytes int
	// receiveOnly says the peer may only receive here: its lines are dropped.
	receiveOnly bool
}

// presence returns the entries of all for the shared channels.
func (ss *sharedSet) presence(all map[string]int) map[string]int {
	p := make(map[string]int, len(ss.channels))
	for name := range ss.channels {
		if n, ok := all[name]; ok {
			p[name] = n
		}
	}
	return p
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
	if cfg.MaxConnections <= 0 {
		cfg.MaxConnections = DefaultMaxConnections
	}
	if cfg.MaxConnectionsPerIP <= 0 {
		cfg.MaxConnectionsPerIP = DefaultMaxConnectionsPerIP
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.Shared == nil {
		cfg.Shared = func(string) []string { return nil }
	}
	s := &Server{cfg: cfg, ln: ln, senders: map[string]*sender{}, inbound: map[*inbound]struct{}{},
		perIP: map[string]int{}}
	// ctx bounds what the read loops wait for (delivery under the overflow policy);
	// Close ends it.
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s
}

// Start accepts links until ctx ends or Shutdown or Close is called, and returns once
// the listener is closed. When ctx ends it closes the server as Close does, and returns
// after every connection's goroutines have ended. A server that was closed returns
// net.ErrClosed.
func (s *Server) Start(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return net.ErrClosed
	}
	if s.started {
		s.mu.Unlock()
		return errors.New("peer: server already started")
	}
	s.started = true
	s.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { _ = s.ln.Close() })
	defer stop()
	s.acceptLoop()
	if ctx.Err() != nil {
		return s.Close()
	}
	return nil
}

// acceptLoop accepts connections until the listener is closed, each served by a
// goroutine of its own. An accept error that does not end the listener (running out of
// file descriptors) is logged and retried with backoff (ipc.AcceptLoop): giving up would
// leave the pod unreachable to its peers while it stays ready.
func (s *Server) acceptLoop() {
	ipc.AcceptLoop(s.ln, s.ctx.Done(), func(err error) { s.cfg.Log.Error(err, "Accepting peer connection failed; retrying") },
		s.accept)
}

// accept admits conn under the connection caps and serves it; it returns false once the
// server is closed.
func (s *Server) accept(conn net.Conn) bool {
	in := &inbound{conn: conn, ip: remoteIP(conn), bye: make(chan struct{}), done: make(chan struct{}),
		presence: make(chan struct{}, 1)}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		_ = conn.Close()
		return false
	}
	if reason := s.admitLocked(in.ip); reason != "" {
		s.mu.Unlock()
		s.refuseEarly(in, reason)
		return true
	}
	s.inbound[in] = struct{}{}
	s.perIP[in.ip]++
	s.wg.Add(1)
	s.mu.Unlock()
	go s.run(in)
	return true
}

// admitLocked returns why a new connection from ip is over a connection cap, or "".
func (s *Server) admitLocked(ip string) string {
	switch {
	case len(s.inbound) >= s.cfg.MaxConnections:
		return RefusedConnectionLimit
	case s.perIP[ip] >= s.cfg.MaxConnectionsPerIP:
		return RefusedSourceLimit
	}
	return ""
}

// refuseEarly closes a connection over a cap, from the accept loop: it counts and
// (sampled) logs it, and says why without waiting for a peer that may not read.
func (s *Server) refuseEarly(in *inbound, reason string) {
	s.cfg.Metrics.Refused.WithLabelValues(reason).Inc()
	if held, ok := s.logs.allow(reason); ok {
		s.cfg.Log.Info("Refused peer connection", "remote", in.conn.RemoteAddr().String(), "reason", reason,
			"maxConnections", s.cfg.MaxConnections, "maxConnectionsPerIP", s.cfg.MaxConnectionsPerIP, "alsoRefusedSinceLastLog", held)
	}
	_ = in.conn.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	_, _ = in.conn.Write(ReasonFrame(FrameRefuse, "too many connections ("+reason+")"))
	_ = in.conn.Close()
}

// run serves one accepted connection. It is the last line of defence of the sidecar
// against what a peer sends: a panic below is counted, logged and ends only this
// connection (it is still a bug to fix).
func (s *Server) run(in *inbound) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.inbound, in)
		if s.perIP[in.ip]--; s.perIP[in.ip] <= 0 {
			delete(s.perIP, in.ip)
		}
		s.mu.Unlock()
	}()
	defer close(in.done)
	defer func() { _ = in.conn.Close() }()
	defer s.recoverConn("in", in.conn)
	err := s.serve(in)
	var pe *ProtocolError
	switch {
	case errors.As(err, &pe):
		s.protocolError("in", in, pe)
	case err != nil && !errors.Is(err, net.ErrClosed):
		s.cfg.Log.V(1).Info("Inbound peer link ended", "remote", in.conn.RemoteAddr().String(), "err", err)
	}
}

// recoverConn is deferred by every peer connection goroutine: it turns a panic into a
// counted, logged, closed connection.
func (s *Server) recoverConn(direction string, conn net.Conn) {
	if r := recover(); r != nil {
		recovered(s.cfg.Metrics, s.cfg.Log, direction, conn, r)
	}
}

// recovered records a panic of a peer connection goroutine and closes its connection.
func recovered(m *Metrics, log logr.Logger, direction string, conn net.Conn, r any) {
	m.Panics.WithLabelValues(direction).Inc()
	log.Error(fmt.Errorf("panic: %v", r), "Peer connection goroutine panicked; closed the connection",
		"direction", direction, "remote", conn.RemoteAddr().String(), "stack", string(debug.Stack()))
	_ = conn.Close()
}

// protocolError counts and (sampled) logs a link ended by a protocol violation.
func (s *Server) protocolError(direction string, in *inbound, pe *ProtocolError) {
	s.cfg.Metrics.ProtocolErrors.WithLabelValues(direction, pe.Reason).Inc()
	if held, ok := s.logs.allow("protocol/" + pe.Reason); ok {
		s.cfg.Log.Info("Closed peer link: protocol error", "remote", in.conn.RemoteAddr().String(),
			"pod", in.id.Namespace+"/"+in.id.Name, "uid", in.id.UID, "reason", pe.Reason, "detail", pe.Detail,
			"alsoClosedSinceLastLog", held)
	}
}

func remoteIP(conn net.Conn) string {
	if tcp, ok := conn.RemoteAddr().(*net.TCPAddr); ok {
		return tcp.IP.String()
	}
	return conn.RemoteAddr().String()
}

// sampledLogs lets through, per key, the first log and then at most one a second, with
// the count of those held back since.
type sampledLogs struct {
	mu   sync.Mutex
	keys map[string]*sampled
}

type sampled struct {
	last time.Time
	held int
}

// allow reports whether to log an event of key now, and how many were held back.
func (l *sampledLogs) allow(key string) (int, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.keys == nil {
		l.keys = map[string]*sampled{}
	}
	e := l.keys[key]
	if e == nil {
		e = &sampled{}
		l.keys[key] = e // keys are a bounded set of reasons
	}
	now := time.Now()
	if !e.last.IsZero() && now.Sub(e.last) < time.Second {
		e.held++
		return 0, false
	}
	held := e.held
	e.last, e.held = now, 0
	return held, true
}

func (s *Server) refuse(in *inbound, label, reason string) error {
	s.cfg.Metrics.Refused.WithLabelValues(label).Inc()
	if held, ok := s.logs.allow(label); ok {
		s.cfg.Log.Info("Refused peer link", "remote", in.conn.RemoteAddr().String(),
			"pod", in.id.Namespace+"/"+in.id.Name, "uid", in.id.UID, "reason", label, "detail", reason, "alsoRefusedSinceLastLog", held)
	}
	// The handshake deadline may have passed: the reason gets a moment of its own.
	_ = in.conn.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = in.conn.Write(ReasonFrame(FrameRefuse, reason))
	return fmt.Errorf("refused: %s", reason)
}

// secure runs cfg.Secure on in and makes in speak over the secured connection. It
// returns the check of the identity HELLO claims (nil if none was proved).
func (s *Server) secure(in *inbound) (func(Identity) error, error) {
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
	// One deadline bounds everything before authorization: the TLS handshake (if any)
	// and HELLO.
	_ = in.conn.SetDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	var check func(Identity) error
	if s.cfg.Secure != nil {
		var err error
		if check, err = s.secure(in); err != nil {
			return err
		}
	}
	conn := in.conn
	h, err := s.hello(in)
	if err != nil {
		return err
	}
	// Revalidate reads the identity under s.mu: one it has not seen yet is
	// authorized below against the membership Revalidate was called for.
	s.mu.Lock()
	in.id = h.Pod
	s.mu.Unlock()
	v := min(h.MaxVersion, Version)
	if v < max(h.MinVersion, MinVersion) {
		return s.refuse(in, RefusedVersion, fmt.Sprintf("no common protocol version: peer speaks %d-%d, this sidecar %d-%d",
			h.MinVersion, h.MaxVersion, MinVersion, Version))
	}
	if check != nil {
		if err := check(h.Pod); err != nil {
			label := RefusedIdentity
			var r *Refusal
			if errors.As(err, &r) {
				label, err = r.Reason, r.Err
			}
			return s.refuse(in, label, err.Error())
		}
	}
	if reason := s.cfg.Authorize(h.Pod, in.ip); reason != "" {
		return s.refuse(in, RefusedUnauthorized, reason)
	}
	s.mu.Lock()
	in.shared.Store(s.sharedFor(in.id))
	s.mu.Unlock()
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
	w.Presence = in.shared.Load().presence(s.cfg.Router.Presence())
	if _, err := conn.Write(w.Frame()); err != nil {
		return err
	}
	_ = conn.SetDeadline(time.Time{})
	fr := NewReader(conn, in.shared.Load().maxFrame)
	defer fr.Close()
	// The read buffer counts against the memory budget while the link is up.
	budget := s.cfg.Router.Budget()
	budget.Add(buffer.ChunkSize)
	defer budget.Add(-buffer.ChunkSize)
	fr.SetReadTimeout(conn, 3*s.cfg.Keepalive)
	s.mu.Lock()
	in.fr = fr
	fr.SetMax(in.shared.Load().maxFrame) // Revalidate may have moved it meanwhile
	s.mu.Unlock()
	s.cfg.Log.V(1).Info("Accepted peer link", "pod", h.Pod.Namespace+"/"+h.Pod.Name, "version", v,
		"resumeAfter", w.LastSeq, "known", w.Known)
	s.cfg.Metrics.Links.WithLabelValues("in", "up").Inc()
	defer s.cfg.Metrics.Links.WithLabelValues("in", "up").Dec()

	readDone := make(chan struct{})
	werr := make(chan error, 1)
	go func() {
		var err error
		defer func() { werr <- err }()
		defer s.recoverConn("in", conn)
		err = s.writeLoop(in, st, readDone)
		if err != nil {
			_ = conn.Close()
		}
	}()
	err = s.readLoop(in, st, fr)
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

// hello reads and decodes the connection's HELLO within the handshake timeout. It is
// read with no buffer ahead of its bytes, so an idle connection costs little.
func (s *Server) hello(in *inbound) (Hello, error) {
	t, body, err := ReadHandshake(in.conn, maxHandshakeBytes)
	var ne net.Error
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		return Hello{}, s.refuse(in, RefusedHandshakeTimeout, fmt.Sprintf("no HELLO within %s", s.cfg.HandshakeTimeout))
	case errors.Is(err, ErrFrame):
		return Hello{}, s.refuse(in, RefusedHandshake, err.Error())
	case err != nil:
		return Hello{}, err
	case t != FrameHello:
		return Hello{}, s.refuse(in, RefusedHandshake, fmt.Sprintf("expected HELLO, got frame type %d", t))
	}
	h, err := ParseHello(body)
	if err != nil {
		return Hello{}, s.refuse(in, RefusedHandshake, err.Error())
	}
	return h, nil
}

// sharedFor returns what a link of the member id may carry: the channels discovery
// says the two pods share that the router serves. Called with s.mu held (so that
// Revalidate and a new connection agree on the order of snapshots).
func (s *Server) sharedFor(id Identity) *sharedSet {
	ss := &sharedSet{channels: map[string]sharedChannel{}}
	biggest := 0
	var receiveOnly []string
	if s.cfg.ReceiveOnly != nil {
		receiveOnly = s.cfg.ReceiveOnly(id.UID)
	}
	for _, name := range s.cfg.Shared(id.UID) {
		ch := s.cfg.Router.Channel(name)
		if ch == nil {
			continue
		}
		n := ch.Spec().MaxMessageBytes
		ss.channels[name] = sharedChannel{name: name, maxMessageBytes: n, receiveOnly: slices.Contains(receiveOnly, name)}
		biggest = max(biggest, n)
	}
	// A RUN frame may hold MaxRunBytes of short lines whatever maxMessageBytes is.
	ss.maxFrame = max(biggest, MaxRunBytes) + DataOverhead
	return ss
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
func (s *Server) readLoop(in *inbound, st *sender, fr *Reader) error {
	b := batch{s: s, st: st, in: in}
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
		case FrameRun:
			if err := b.addRun(body, fr.Chunk()); err != nil {
				return err
			}
			continue
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
			return protocolError(ReasonSequence, "sequence gap: got %d after %d", d.Seq, b.last)
		}
		if err := b.add(d, fr.Chunk()); err != nil {
			return err
		}
	}
}

// maxBatch bounds the lines dispatched under one completion, so that acknowledgements
// keep flowing while a long buffered stream is dispatched.
const maxBatch = 1024

// batch is the lines dispatched by a read loop since its last blocking read.
type batch struct {
	s  *Server
	st *sender
	in *inbound
	// started and last mirror st.started and st.last for the lines dispatched so far;
	// st is updated when the batch ends, together with its pending entry, so that an
	// acknowledgement never covers a line that is not yet queued.
	started bool
	last    uint64
	n       int
	first   uint64
	c       *router.Completion
	grace   time.Duration
	// run holds consecutive lines of one channel and kind, not yet handed over.
	run     []buffer.Payload
	runChan sharedChannel
	runKind router.Kind
	// notShared, tooLarge and notPermitted say a line for a channel not shared, one over
	// its channel's maxMessageBytes, or one from a member that may only receive, was
	// dropped on this link: the first of each is logged, every one counted.
	notShared, tooLarge, notPermitted bool
}

// add dispatches d, whose payload lives in chunk, as part of the batch: only for a
// channel the two pods share, and only if it fits the channel's maxMessageBytes. A line
// that does not is counted dropped, and its sequence number acknowledged like any
// other, so that the link goes on. A channel name that is not shared and not even a
// DNS label is a protocol error (ParseData leaves that check to this lookup's miss).
func (b *batch) add(d Data, chunk *buffer.Chunk) error {
	if ok, err := b.open(d.Channel, d.Kind, d.Seq, d.Seq, 1); !ok {
		return err
	}
	b.addLine(d.Payload, chunk)
	return nil
}

// open makes the messages first … last, lines of them, of channel and kind part of the
// batch, and reports whether they are to be dispatched: a channel the two pods do not
// share, or one the member may only receive on, counts them dropped instead. A channel
// name that is not even a DNS label is a protocol error, reported before the messages
// count as dispatched, so that their sequence numbers are not recorded as delivered.
func (b *batch) open(channel []byte, kind router.Kind, first, last uint64, lines int) (bool, error) {
	if len(b.run) > 0 && (string(channel) != b.runChan.name || kind != b.runKind) {
		b.flushRun()
	}
	var sc sharedChannel
	shared := true
	if len(b.run) == 0 {
		sc, shared = b.in.shared.Load().channels[string(channel)]
		if !shared {
			if err := CheckChannel(channel); err != nil {
				return false, err
			}
		}
	}
	if b.c == nil {
		b.c = router.NewCompletion(b.st.notify)
		b.first = first
	}
	b.started, b.last = true, last
	if len(b.run) == 0 {
		if !shared {
			b.dropNotShared(string(channel), lines)
			return false, nil
		}
		if sc.receiveOnly { // decided per link: one test per run of lines, not per line
			b.dropNotPermitted(sc.name, lines)
			return false, nil
		}
		b.runChan, b.runKind = sc, kind
	}
	return true, nil
}

// addLine dispatches one message of the open channel, if it fits the channel's
// maxMessageBytes.
func (b *batch) addLine(payload []byte, chunk *buffer.Chunk) {
	if len(payload) > b.runChan.maxMessageBytes {
		b.dropTooLarge(len(payload))
		return
	}
	b.run = append(b.run, buffer.Payload{Data: payload, Ref: chunk})
	b.n++
}

// addRun dispatches the messages of a RUN frame, body, as add does each. A run of lines
// that all fit maxMessageBytes (their bytes together do) is dispatched whole, as one
// payload: the local queues hold it as one item and a line connection writes it as it
// is, and a connection of the other kind gets it split (Router.DeliverBatch). Otherwise
// its messages are split at their delimiters, which ParseRun has counted, and each is
// held to maxMessageBytes alone. A run that the receiver has wholly dispatched already
// is a retransmission and skipped; one that begins inside what it dispatched is a
// protocol error, since a sender resends whole entries after the last sequence number a
// receiver reported.
func (b *batch) addRun(body []byte, chunk *buffer.Chunk) error {
	r, err := ParseRun(body)
	if err != nil {
		return err
	}
	if b.started && r.Last() <= b.last {
		return nil
	}
	if b.started && r.Seq != b.last+1 {
		return protocolError(ReasonSequence, "sequence gap: got a run of %d-%d after %d", r.Seq, r.Last(), b.last)
	}
	if ok, err := b.open(r.Channel, r.Kind, r.Seq, r.Last(), r.Count); !ok {
		return err
	}
	if r.Kind == router.Line && len(r.Payload)-r.Count <= b.runChan.maxMessageBytes {
		b.run = append(b.run, buffer.Payload{Data: r.Payload, Ref: chunk, Run: uint32(r.Count)})
		b.n += r.Count
		return nil
	}
	for msg := range buffer.Messages(r.Payload, r.Kind.Delimiter()) {
		b.addLine(msg, chunk)
	}
	return nil
}

// dropTooLarge counts a line of n bytes over its channel's maxMessageBytes, logging the
// first of the link.
func (b *batch) dropTooLarge(n int) {
	b.s.cfg.Router.Drop(b.runChan.name, ReasonTooLarge, 1)
	if !b.tooLarge {
		b.tooLarge = true
		id := b.in.id
		b.s.cfg.Log.Info("Dropped a peer's line longer than maxMessageBytes", "pod", id.Namespace+"/"+id.Name,
			"uid", id.UID, "channel", b.runChan.name, "bytes", n, "maxMessageBytes", b.runChan.maxMessageBytes, "reason", ReasonTooLarge)
	}
}

// dropNotShared counts n lines for a channel the two pods do not share, logging the
// first of the link. The router labels the count with the channel's name only if this
// sidecar serves it.
func (b *batch) dropNotShared(channel string, n int) {
	b.s.cfg.Router.Drop(channel, ReasonNotShared, n)
	if !b.notShared {
		b.notShared = true
		id := b.in.id
		b.s.cfg.Log.Info("Dropped a peer's line for a channel the two pods do not share", "pod", id.Namespace+"/"+id.Name,
			"uid", id.UID, "channel", channel, "reason", ReasonNotShared)
	}
}

// dropNotPermitted counts n lines from a member that may only receive on channel,
// logging the first of the link.
func (b *batch) dropNotPermitted(channel string, n int) {
	b.s.cfg.Router.Drop(channel, ReasonNotPermitted, n)
	if b.notPermitted {
		return
	}
	b.notPermitted = true
	// Sampled across links too: a member that reconnects in a loop cannot flood the log.
	if held, ok := b.s.logs.allow("drop/" + ReasonNotPermitted); ok {
		id := b.in.id
		b.s.cfg.Log.Info("Dropped a peer's line: the member may only receive on this channel", "pod", id.Namespace+"/"+id.Name,
			"uid", id.UID, "channel", channel, "reason", ReasonNotPermitted, "alsoLoggedLinksHeld", held)
	}
}

// flushRun hands the current run to the router.
func (b *batch) flushRun() {
	if len(b.run) == 0 {
		return
	}
	b.grace = max(b.grace, b.s.cfg.Router.DeliverBatch(b.s.ctx, b.runChan.name, b.runKind, b.run, b.c))
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
		wake.Up(b.st.notify)
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
	ping := time.NewTicker(s.cfg.Keepalive)
	defer ping.Stop()
	presence := s.cfg.Router.PresenceChanged()
	var sentAck uint64
	var buf []byte
	wrote := false
	// send writes one frame. Every frame this loop writes goes out at once, alone, so
	// it needs no write buffer of its own: an idle link holds none (docs/design.md §8.7).
	send := func(frame []byte) error {
		_ = in.conn.SetWriteDeadline(time.Now().Add(3 * s.cfg.Keepalive))
		wrote = true
		_, err := in.conn.Write(frame)
		return err
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
			return send(buf)
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
			if err := s.advertise(in, send); err != nil {
				return err
			}
		case <-in.presence:
			if err := s.advertise(in, send); err != nil {
				return err
			}
		case <-ping.C:
			// A missed notification (taken by a previous connection's writer) is
			// caught here at the latest.
			if err := ack(); err != nil {
				return err
			}
			if !wrote {
				if err := send(PingFrame()); err != nil {
					return err
				}
			}
			wrote = false
		case <-in.bye:
			_ = ack()
			return send(ReasonFrame(FrameGoodbye, "shutdown"))
		case <-readDone:
			return nil
		}
	}
}

// advertise writes the presence of the channels the link's peer shares.
func (s *Server) advertise(in *inbound, send func([]byte) error) error {
	return send(PresenceFrame(in.shared.Load().presence(s.cfg.Router.Presence())))
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
			continue
		}
		s.reshareLocked(in)
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

// reshareLocked brings what the link of in may carry up to date with the membership
// and the channels' specs, and has its presence advertised again if that changed.
func (s *Server) reshareLocked(in *inbound) {
	old := in.shared.Load()
	if old == nil {
		return // still in its handshake, which computes it
	}
	ss := s.sharedFor(in.id)
	if ss.maxFrame == old.maxFrame && maps.Equal(ss.channels, old.channels) {
		return
	}
	in.shared.Store(ss)
	if in.fr != nil {
		in.fr.SetMax(ss.maxFrame)
	}
	wake.Up(in.presence)
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

// Shutdown stops accepting and says GOODBYE on every inbound link (senders then
// reroute their AnyOne lines at once and forget this incarnation), waits until each
// sender has closed its link or ctx ends, then closes what is left as Close does. One
// deadline bounds every link: the links are asked at once and waited for together.
// It returns ctx.Err() if a link was still open when ctx ended.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	_ = s.ln.Close()
	ins := make([]*inbound, 0, len(s.inbound))
	for in := range s.inbound {
		ins = append(ins, in)
		if !s.shutdown {
			close(in.bye)
		}
	}
	s.shutdown = true
	s.mu.Unlock()
	var err error
	for _, in := range ins {
		select {
		case <-in.done:
			continue
		case <-ctx.Done():
			err = ctx.Err()
		}
		break
	}
	return errors.Join(err, s.Close())
}

// Close stops accepting, closes every inbound connection at once (no GOODBYE: senders
// learn of the end from the connection) and joins every connection's goroutines.
// Idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	_ = s.ln.Close()
	for in := range s.inbound {
		_ = in.conn.Close() // read under s.mu: secure replaces it
	}
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
	return nil
}
