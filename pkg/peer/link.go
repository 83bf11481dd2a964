package peer

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime/debug"
	"strconv"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/internal/wake"
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

// Link carries lines from this sidecar to one member pod. It implements router.Remote.
//
// The link keeps every line until the receiver acknowledges it, in its outbox
// (outbox.go), bounded in bytes per channel: the send queue and the retransmit queue in
// one. This file is the session around it: a session (one TCP connection) dials,
// starts with HELLO/WELCOME, after which the link resumes
// after the receiver's last sequence number if the receiver is the same incarnation, or
// settles the lines the old incarnation may have seen (Broadcast: dropped
// peer_restarted; AnyOne: rerouted) if it is not.
type Link struct {
	cfg LinkConfig
	log logr.Logger

	// mu guards the outbox and the session state below.
	mu     sync.Mutex
	outbox outbox
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
	// upGauge, changedGauge and unackedGauge are this link's series of the per-peer
	// gauges, held so a late report after Close cannot recreate a deleted series.
	upGauge, changedGauge, unackedGauge prometheus.Gauge

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
	l := &Link{
		cfg: cfg, log: cfg.Log.WithValues("peer", cfg.Member.Namespace+"/"+cfg.Member.Name, "peerUID", cfg.Member.UID),
		presence:     map[string]int{},
		wake:         make(chan struct{}, 1),
		upGauge:      cfg.Metrics.LinkUp.WithLabelValues(cfg.Member.Name),
		changedGauge: cfg.Metrics.LinkChanged.WithLabelValues(cfg.Member.Name),
		unackedGauge: cfg.Metrics.LinkUnacked.WithLabelValues(cfg.Member.Name),
	}
	l.outbox.init(cfg.Metrics.Unacked, l.unackedGauge, &l.mu, &l.closed)
	l.outbox.budget = cfg.Router.Budget()
	l.reportUp(false)
	cfg.Metrics.track(l)
	return l
}

// reportUnacked brings the unacknowledged-bytes gauges up to date (at scrape time).
func (l *Link) reportUnacked() {
	l.mu.Lock()
	l.outbox.report()
	l.mu.Unlock()
}

// reportUp publishes whether the link is established, and since when.
func (l *Link) reportUp(up bool) {
	v := 0.0
	if up {
		v = 1
	}
	l.upGauge.Set(v)
	l.changedGauge.SetToCurrentTime()
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

// Send queues a message under the channel's overflow policy, as the link applies it
// (patience).
func (l *Link) Send(ctx context.Context, channel string, kind router.Kind, line buffer.Payload, anyOne bool, ov discovery.Overflow) (router.Result, string) {
	ov = l.patience(ov)
	l.mu.Lock()
	defer l.mu.Unlock()
	st := l.outbox.channel(channel)
	if res, reason := l.admitLocked(ctx, st, len(line.Data), ov); res != router.Queued {
		return res, reason
	}
	line.Ref.Retain(1)
	l.outbox.push(st, line.Ref, line.Data, kind, anyOne)
	l.kickLocked()
	return router.Queued, ""
}

// SendBatch queues Broadcast lines of one channel in order, as Send does for each, with
// one lock and one wakeup of the writer per batch. It stops at the first line that is
// not queued and returns its index with the result and reason.
//
// Lines that lie one after another in one chunk, each followed by its delimiter (an
// app read's lines, as the endpoint copies them), are queued as runs: one entry, one
// copy and one RUN frame for up to MaxRunBytes of them. A run enters only if it fits at
// once; otherwise its lines go one by one, under the policy as any line does.
func (l *Link) SendBatch(ctx context.Context, channel string, kind router.Kind, lines []buffer.Payload, ov discovery.Overflow) (n int, res router.Result, reason string) {
	// Every line's chunk is retained before the writer can see it (one atomic
	// operation per chunk), and what was not queued is released on the way out.
	buffer.RetainLines(lines)
	defer func() { buffer.ReleaseLines(lines[n:]) }()
	ov = l.patience(ov)
	l.mu.Lock()
	defer l.mu.Unlock()
	st := l.outbox.channel(channel)
	delim := kind.Delimiter()
	for i := 0; i < len(lines); i++ {
		if j, run := buffer.Run(lines[i:], delim, MaxRunBytes, maxRunCount); j > 1 && !l.closed && st.bound.Fits(len(run), ov.QueueBytes) {
			l.outbox.pushRun(st, lines[i].Ref, run, j, kind, false)
			lines[i].Ref.Release(j - 1) // one reference for the entry
			i += j - 1
			continue
		}
		line := lines[i]
		if i > 0 && st.bound.Bytes() != 0 && st.bound.Bytes()+len(line.Data) > ov.QueueBytes {
			// Admission may wait for acknowledgements: let the writer send what is
			// queued.
			l.kickLocked()
		}
		if res, reason := l.admitLocked(ctx, st, len(line.Data), ov); res != router.Queued {
			l.kickLocked()
			return i, res, reason
		}
		l.outbox.push(st, line.Ref, line.Data, kind, false)
	}
	l.kickLocked()
	return len(lines), router.Queued, ""
}

// patience returns the overflow policy a link applies for ov. Slow readers are judged
// where they are, by the receiving sidecar, so a link is more patient than a local
// queue: under WaitThenDrop and Disconnect it waits maxWait plus one keepalive
// interval, because the receiver may hold a slow reader's lines unacknowledged for up
// to maxWait (and pause its link that long while it judges a reader under Disconnect),
// and a drop here would hit every reader over there, fast or slow.
func (l *Link) patience(ov discovery.Overflow) discovery.Overflow {
	if ov.Policy != discovery.Block {
		ov.Policy = discovery.WaitThenDrop
		ov.MaxWait += l.cfg.Keepalive
	}
	return ov
}

// admitLocked admits a message of n bytes on st under ov, waiting for acknowledgements
// as the policy says, and returns Queued or why not. A closed link drops for reason
// peer_removed, before and after a wait.
func (l *Link) admitLocked(ctx context.Context, st *chanState, n int, ov discovery.Overflow) (router.Result, string) {
	if l.closed {
		return router.Dropped, router.ReasonPeerRemoved
	}
	if st.bound.Fits(n, ov.QueueBytes) {
		return router.Queued, ""
	}
	res, reason := st.bound.Admit(ctx, n, ov)
	if res == router.Queued && l.closed {
		return router.Dropped, router.ReasonPeerRemoved
	}
	return res, reason
}

// kickLocked wakes the writer. A link that is down has no writer to report the
// queue's growth: a scrape does (Metrics.refresh), so that queueing costs no gauge
// update per line.
func (l *Link) kickLocked() {
	wake.Up(l.wake)
}

// settleLocked settles the messages pick selects (outbox.settle): Broadcast ones are
// counted dropped for reason and logged here, AnyOne ones returned for rerouting.
func (l *Link) settleLocked(pick func(*outMsg) bool, reason string) []router.Message {
	reroute, drops := l.outbox.settle(pick)
	for ch, c := range drops {
		l.cfg.Router.Drop(ch, reason, c)
		l.log.Info("Dropped unacknowledged lines", "channel", ch, "reason", reason, "count", c)
	}
	return reroute
}

// Predicates of settleLocked.
func anyMsg(*outMsg) bool                    { return true }
func anyOneMsg(m *outMsg) bool               { return m.anyOne }
func sentUpTo(seq uint64) func(*outMsg) bool { return func(m *outMsg) bool { return m.seq <= seq } }

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
		reroute = l.settleLocked(anyOneMsg, "")
		// Nor is it a receiver any more: what it advertised is forgotten until the
		// next WELCOME, so that AnyOne lines are not held for it while its link is down.
		l.presence = map[string]int{}
	}
	l.mu.Unlock()
	l.cfg.Router.Reroute(reroute)
	l.cfg.Router.Notify()
	if rerr == nil {
		rerr = wErr
	}
	return errors.Join(errEstablished, rerr)
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
		if w.LastSeq > l.outbox.sentSeq {
			l.mu.Unlock()
			return protocolError(ReasonLastSeq, "WELCOME lastSeq %d, but the highest sequence number sent is %d", w.LastSeq, l.outbox.sentSeq)
		}
		l.outbox.ack(w.LastSeq)
	case w.Known && !l.havePeer:
		// First contact of this link, and the receiver remembers this sidecar's
		// incarnation from an earlier link (the member left and came back): nothing it
		// saw is in this queue, so the queue continues its numbering rather than be
		// acknowledged by it.
		if err := l.outbox.renumber(w.LastSeq); err != nil {
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
		reroute = l.settleLocked(sentUpTo(l.outbox.sentSeq), router.ReasonPeerRestarted)
	}
	l.outbox.startEncoding(w.Version >= VersionRun)
	l.havePeer, l.peerInc = true, w.Pod.Incarnation
	l.presence = w.Presence
	l.up = true
	l.reportUp(true)
	l.conn = conn
	l.ended = make(chan struct{})
	l.kickLocked()
	l.mu.Unlock()
	l.log.V(1).Info("Peer link established", "version", w.Version, "incarnation", w.Pod.Incarnation)
	l.cfg.Router.Reroute(reroute)
	l.cfg.Router.Notify()
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
		buf, n := l.outbox.take(spare)
		bye := l.bye && l.outbox.len() == 0
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
			sent := l.outbox.sentSeq
			if seq <= sent {
				l.outbox.ack(seq)
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
	l.reportUp(false)
	l.outbox.stopEncoding()
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
	for l.outbox.len() > 0 && ctx.Err() == nil {
		c := l.outbox.space.C()
		l.mu.Unlock()
		select {
		case <-c:
		case <-ctx.Done():
		}
		l.mu.Lock()
	}
	left := l.outbox.len() > 0
	l.bye = true
	ended := l.ended
	l.mu.Unlock()
	wake.Up(l.wake)
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

// deleteSeries removes the link's per-peer series: the peer is no longer a member.
func (l *Link) deleteSeries() {
	p := l.cfg.Member.Name
	l.cfg.Metrics.untrack(l)
	l.cfg.Metrics.LinkUp.DeleteLabelValues(p)
	l.cfg.Metrics.LinkChanged.DeleteLabelValues(p)
	l.cfg.Metrics.LinkUnacked.DeleteLabelValues(p)
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
	reroute := l.settleLocked(anyMsg, reason)
	l.mu.Unlock()
	l.deleteSeries()
	if reason != router.ReasonShutdown {
		l.cfg.Router.Reroute(reroute)
	} else {
		for _, m := range reroute {
			l.cfg.Router.Drop(m.Channel, reason, 1)
		}
	}
	l.cfg.Router.Notify()
}
