package router

import (
	"context"
	"math/bits"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/discovery"
)

// Remote is a member pod reached over a peer link. Peer links implement it.
type Remote interface {
	// ID is the remote pod's UID.
	ID() string
	// Send queues one message for the remote pod under the channel's overflow policy.
	// anyOne marks lines that must be rerouted, not dropped, if the remote restarts.
	// The remote takes its own reference on data's chunk.
	Send(ctx context.Context, channel string, kind Kind, data buffer.Payload, anyOne bool, ov discovery.Overflow) (Result, string)
	// SendBatch queues Broadcast messages in order, like Send for each, and stops at
	// the first that is not queued: it returns that message's index n (len(data) if all
	// were queued) with the result and reason.
	SendBatch(ctx context.Context, channel string, kind Kind, data []buffer.Payload, ov discovery.Overflow) (n int, res Result, reason string)
	// Presence reports how many connections the remote advertised on channel, and
	// whether its link is established (presence is only trusted while it is).
	Presence(channel string) (conns int, up bool)
}

// Router holds the channels a sidecar serves.
type Router struct {
	log     logr.Logger
	metrics *Metrics

	mu       sync.RWMutex
	channels map[string]*Channel

	// presence is broadcast when the local connection count of any channel changes;
	// peer links subscribe to advertise it.
	presence buffer.Signal
	// changed is broadcast when candidates may have appeared (a remote's presence or
	// link state changed); AnyOne lines waiting for a receiver re-check on it.
	changed buffer.Signal

	// budget is the sidecar's memory budget (nil: none), charged by every local queue.
	budget *buffer.Budget

	// wg joins the reroute goroutines.
	wg     sync.WaitGroup
	ctx    context.Context
	cancel context.CancelFunc
}

// New returns an empty router.
func New(log logr.Logger, m *Metrics) *Router {
	if m == nil {
		m = NewMetrics(nil)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Router{log: log, metrics: m, channels: map[string]*Channel{}, ctx: ctx, cancel: cancel}
}

// UseBudget makes every local queue attached from now on count its bytes against
// budget and admit lines only while they fit it (docs/design.md §8.7). Call it before
// the first Attach.
func (r *Router) UseBudget(budget *buffer.Budget) { r.budget = budget }

// Budget returns the memory budget (nil: none), which the peer links and the read
// buffers of connections charge too.
func (r *Router) Budget() *buffer.Budget {
	if r == nil {
		return nil
	}
	return r.budget
}

// Budget returns the sidecar's memory budget (nil: none), for an endpoint to charge
// the read buffers of its connections.
func (ch *Channel) Budget() *buffer.Budget { return ch.r.budget }

// Close cancels waits of rerouted lines and joins their goroutines, and releases the
// parked AnyOne lines unacknowledged (their senders reroute them). Idempotent.
func (r *Router) Close() {
	r.cancel()
	r.wg.Wait()
	r.mu.RLock()
	chans := make([]*Channel, 0, len(r.channels))
	for _, ch := range r.channels {
		chans = append(chans, ch)
	}
	r.mu.RUnlock()
	for _, ch := range chans {
		ch.releaseParked()
	}
}

// Channel is one served channel: its spec, its local connections and its remote members.
type Channel struct {
	r    *Router
	name string
	spec atomic.Pointer[discovery.Spec]
	// conns and remotes are copy-on-write snapshots so the hot path reads them without
	// a lock; writers hold mu.
	mu      sync.Mutex
	conns   atomic.Pointer[[]*Conn]
	remotes atomic.Pointer[[]member]
	rr      atomic.Uint64
	// blockLogged is when a block_timeout drop was last logged (Unix nanoseconds), so
	// that a receiver dropping every line logs once a second, not once a line.
	blockLogged atomic.Int64
	// parked holds AnyOne lines from peers that arrived while the channel had no local
	// connection, for the next one (park.go); parkedBytes bounds them. Guarded by mu.
	parked      []*parkedBatch
	parkedBytes int

	linesIn  prometheus.Counter
	linesOut prometheus.Counter
	bytes    prometheus.Gauge
	nconns   prometheus.Gauge
}

// member is a remote pod of the channel with the conditions discovery reports.
type member struct {
	Remote
	ready, serving bool
}

// Conn is a local app connection registered on a channel.
type Conn struct {
	ch *Channel
	// Kind is the framing of the app connection; the endpoint translates to it.
	Kind Kind
	// Queue holds the messages waiting to be written to the app.
	Queue *Queue
	// name identifies the connection in logs (its remote address).
	name string
	kick func()
}

// Ensure returns the channel named name, creating it, and applies spec.
func (r *Router) Ensure(name string, spec discovery.Spec) *Channel {
	spec = spec.WithDefaults()
	r.mu.Lock()
	defer r.mu.Unlock()
	ch := r.channels[name]
	if ch == nil {
		ch = &Channel{r: r, name: name,
			linesIn:  r.metrics.LinesIn.WithLabelValues(name),
			linesOut: r.metrics.LinesOut.WithLabelValues(name),
			bytes:    r.metrics.QueueBytes.WithLabelValues(name),
			nconns:   r.metrics.Connections.WithLabelValues(name),
		}
		ch.conns.Store(&[]*Conn{})
		ch.remotes.Store(&[]member{})
		r.channels[name] = ch
	}
	ch.spec.Store(&spec)
	return ch
}

// Remove forgets a channel. Its endpoints must have closed their connections first.
func (r *Router) Remove(name string) {
	r.mu.Lock()
	delete(r.channels, name)
	r.mu.Unlock()
	r.presence.Broadcast()
}

// Channel returns the channel named name, or nil.
func (r *Router) Channel(name string) *Channel {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.channels[name]
}

// Presence returns the number of local connections of every channel.
func (r *Router) Presence() map[string]int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	p := make(map[string]int, len(r.channels))
	for name, ch := range r.channels {
		p[name] = len(*ch.conns.Load())
	}
	return p
}

// PresenceChanged returns a channel closed at the next local presence change.
func (r *Router) PresenceChanged() <-chan struct{} { return r.presence.C() }

// Notify tells waiting AnyOne lines that candidates may have changed.
func (r *Router) Notify() { r.changed.Broadcast() }

// Name returns the channel's name.
func (ch *Channel) Name() string { return ch.name }

// Spec returns the channel's current spec (with defaults).
func (ch *Channel) Spec() discovery.Spec { return *ch.spec.Load() }

// SetMembers replaces the channel's remote members. Remote i has the conditions of
// ready[i] and serving[i].
func (ch *Channel) SetMembers(remotes []Remote, ready, serving []bool) {
	ms := make([]member, len(remotes))
	for i, rem := range remotes {
		ms[i] = member{Remote: rem, ready: ready[i], serving: serving[i]}
	}
	slices.SortFunc(ms, func(a, b member) int {
		if a.ID() < b.ID() {
			return -1
		}
		if a.ID() > b.ID() {
			return 1
		}
		return 0
	})
	ch.remotes.Store(&ms)
	ch.r.changed.Broadcast()
}

// Attach registers a local connection of the given kind, named name in logs. kick must
// end the connection; it is called when the Disconnect policy finds it too slow.
func (ch *Channel) Attach(kind Kind, name string, kick func()) *Conn {
	c := &Conn{ch: ch, Kind: kind, name: name, kick: kick}
	budget := ch.r.budget
	c.Queue = NewQueue(func(d int) {
		ch.bytes.Add(float64(d))
		budget.Add(d)
	}, ch.drop)
	c.Queue.UseBudget(budget)
	ch.mu.Lock()
	ch.unparkLocked(c)
	next := append(slices.Clone(*ch.conns.Load()), c)
	ch.conns.Store(&next)
	ch.mu.Unlock()
	ch.nconns.Inc()
	ch.r.presence.Broadcast()
	ch.r.changed.Broadcast()
	return c
}

// Detach unregisters c and counts what was still queued for it as dropped.
func (c *Conn) Detach() {
	ch := c.ch
	ch.mu.Lock()
	cur := *ch.conns.Load()
	i := slices.Index(cur, c)
	if i >= 0 {
		next := slices.Delete(slices.Clone(cur), i, i+1)
		ch.conns.Store(&next)
	}
	ch.mu.Unlock()
	if i >= 0 {
		ch.nconns.Dec()
		ch.r.presence.Broadcast()
	}
	left := c.Queue.Close()
	c.Failed(left, ReasonClosed)
}

// Written counts the lines of items written to the app, releases their bytes and
// completes them.
func (c *Conn) Written(items []Item) {
	if lines := c.settle(items); lines > 0 {
		c.ch.linesOut.Add(float64(lines))
	}
}

// Failed counts the lines of items taken for c that could not be written as dropped for
// reason, releases their bytes and completes them.
func (c *Conn) Failed(items []Item, reason string) {
	if lines := c.settle(items); lines > 0 {
		c.ch.drop(reason, lines)
	}
}

// settle ends the queue's hold on items, written or not: their completions and chunk
// references are released, and their bytes returned to the queue's bound. It returns
// the lines they hold.
func (c *Conn) settle(items []Item) int {
	n, pins, lines := settleItems(items)
	c.Queue.release(n, pins)
	return lines
}

// Channel returns the channel c is attached to.
func (c *Conn) Channel() *Channel { return c.ch }

// Name returns the connection's name in logs.
func (c *Conn) Name() string { return c.name }

// Drop counts n lines of the channel dropped for reason, for losses outside any queue
// (an app's frame that cannot be read).
func (ch *Channel) Drop(reason string, n int) { ch.drop(reason, n) }

func (ch *Channel) drop(reason string, n int) {
	ch.r.metrics.Dropped.WithLabelValues(ch.name, reason).Add(float64(n))
	ch.r.log.V(4).Info("Dropped lines", "channel", ch.name, "reason", reason, "count", n)
}

// Drop counts n lines of channel dropped for reason (used by peer links). The name
// may come from a peer: only a channel this sidecar serves gets a series of its own,
// any other is counted under OtherChannel, so that names a peer makes up cannot grow
// the metrics without bound.
func (r *Router) Drop(channel, reason string, n int) {
	label := channel
	if r.Channel(channel) == nil {
		label = OtherChannel
	}
	r.metrics.Dropped.WithLabelValues(label, reason).Add(float64(n))
	r.log.V(4).Info("Dropped lines", "channel", label, "reason", reason, "count", n)
}

// pushLocal queues it for c and handles the outcome. It reports whether it was queued.
func (ch *Channel) pushLocal(ctx context.Context, c *Conn, it Item, ov discovery.Overflow) bool {
	res, reason := c.Queue.Push(ctx, it, ov)
	switch res {
	case Queued:
		return true
	case Disconnect:
		ch.r.log.Info("Disconnecting slow reader", "channel", ch.name, "conn", c.name, "queueBytes", ov.QueueBytes)
		c.kick()
	}
	ch.dropFor(c.name, reason, it.Lines(), ov)
	return false
}

// Route sends a line accepted from the local connection from (which may be nil for
// rerouted lines) to its receivers. data must stay valid while it is queued (it is not
// in a chunk). Route blocks as the overflow policy says; ctx ends any wait.
func (ch *Channel) Route(ctx context.Context, from *Conn, kind Kind, data []byte) {
	ch.RouteBatch(ctx, from, kind, []buffer.Payload{{Data: data}})
}

// RouteBatch routes lines accepted from from, in order, as Route does for each; it
// takes each receiver's lock and updates the metrics once per batch rather than per
// line, which is most of what routing a short line costs.
//
// Every queue that keeps a line takes its own reference on the line's chunk; the
// caller releases its references afterwards.
func (ch *Channel) RouteBatch(ctx context.Context, from *Conn, kind Kind, lines []buffer.Payload) {
	spec := ch.spec.Load()
	if from != nil {
		ch.linesIn.Add(float64(len(lines)))
	}
	if spec.Delivery == discovery.AnyOne {
		for _, data := range lines {
			ch.routeAnyOne(ctx, from, kind, data, spec.Overflow)
		}
		return
	}
	for _, c := range *ch.conns.Load() {
		if c != from {
			ch.pushBatch(ctx, c, kind, lines, nil, spec.Overflow)
		}
	}
	for _, m := range *ch.remotes.Load() {
		if !m.serving {
			continue
		}
		for rest := lines; len(rest) > 0; {
			n, res, reason := m.SendBatch(ctx, ch.name, kind, rest, spec.Overflow)
			if res == Queued {
				break
			}
			ch.dropFor(m.ID(), reason, rest[n].Lines(), spec.Overflow)
			rest = rest[n+1:]
		}
	}
}

// dropFor counts n lines for receiver dropped for reason; a block_timeout is also
// logged (at most once a second per channel), since it means a receiver held the
// channel back for maxBlock: gone, or far too slow for Block.
func (ch *Channel) dropFor(receiver, reason string, n int, ov discovery.Overflow) {
	ch.drop(reason, n)
	if reason != ReasonBlockTimeout {
		return
	}
	now := time.Now().UnixNano()
	if last := ch.blockLogged.Load(); now-last < int64(time.Second) || !ch.blockLogged.CompareAndSwap(last, now) {
		return
	}
	ch.r.log.Info("Dropping lines for a receiver that held the channel back for maxBlock", "channel", ch.name,
		"receiver", receiver, "maxBlock", ov.MaxBlock, "reason", reason)
}

// pushBatch queues data for c and counts the lines that are not queued. Queued
// payloads take a reference on done (nil for lines of local apps). It returns how many
// payloads were dropped (a run is one).
func (ch *Channel) pushBatch(ctx context.Context, c *Conn, kind Kind, data []buffer.Payload, done *Completion, ov discovery.Overflow) int {
	dropped := 0
	for rest := data; len(rest) > 0; {
		n, res, reason := c.Queue.PushBatch(ctx, kind, rest, done, ov)
		if res == Queued {
			break
		}
		if res == Disconnect {
			ch.r.log.Info("Disconnecting slow reader", "channel", ch.name, "conn", c.name, "queueBytes", ov.QueueBytes)
			c.kick()
			// The connection is going away: what is left of the batch is not for it.
			ch.drop(reason, countLines(rest[n:]))
			dropped += len(rest) - n
			break
		}
		ch.dropFor(c.name, reason, rest[n].Lines(), ov)
		dropped++
		rest = rest[n+1:]
	}
	return dropped
}

// countLines returns how many messages data holds.
func countLines(data []buffer.Payload) int {
	n := 0
	for _, d := range data {
		n += d.Lines()
	}
	return n
}

// routeAnyOne picks the next candidate pod round robin and hands it the line, waiting
// up to maxWait for a candidate to appear.
func (ch *Channel) routeAnyOne(ctx context.Context, from *Conn, kind Kind, data buffer.Payload, ov discovery.Overflow) {
	var deadline <-chan time.Time
	for {
		wake := ch.r.changed.C()
		if ch.tryAnyOne(ctx, from, kind, data, ov) {
			return
		}
		if deadline == nil {
			t := time.NewTimer(ov.MaxWait)
			defer t.Stop()
			deadline = t.C
		}
		select {
		case <-wake:
		case <-deadline:
			ch.drop(ReasonNoReceiver, 1)
			return
		case <-ctx.Done():
			ch.drop(ReasonShutdown, 1)
			return
		}
	}
}

// tryAnyOne reports whether it found a candidate (the line is then queued or counted).
func (ch *Channel) tryAnyOne(ctx context.Context, from *Conn, kind Kind, data buffer.Payload, ov discovery.Overflow) bool {
	conns := *ch.conns.Load()
	local := false
	for _, c := range conns {
		if c != from {
			local = true
			break
		}
	}
	remotes := *ch.remotes.Load()
	// Candidate 0 is the own pod, then the remotes in UID order, so every sender
	// walks the same ring. The candidates are a bit set, on the stack for channels of
	// up to 4,095 members, so that a line allocates nothing however many members the
	// channel has.
	var words [64]uint64
	set := words[:]
	if n := (len(remotes) + 64) / 64; n > len(set) {
		set = make([]uint64, n)
	}
	count := 0
	if local {
		set[0], count = 1, 1
	}
	for i, m := range remotes {
		if n, up := m.Presence(ch.name); m.ready && up && n > 0 {
			set[(i+1)/64] |= 1 << ((i + 1) % 64)
			count++
		}
	}
	if count == 0 {
		// No member is reachable now. A ready member whose link is down (a partition,
		// a timed-out link redialling) but which had connections when it was last
		// heard is still a receiver: its link holds the line and sends it when it
		// resumes, exactly once (guarantee (a)), or reroutes it if the member restarts,
		// says GOODBYE or leaves (at-least-once). Dropping it no_receiver after maxWait
		// would lose a line between two live sidecars.
		for i, m := range remotes {
			if n, up := m.Presence(ch.name); m.ready && !up && n > 0 {
				set[(i+1)/64] |= 1 << ((i + 1) % 64)
				count++
			}
		}
	}
	if count == 0 {
		return false
	}
	pick := nthBit(set, int(ch.rr.Add(1)-1)%count) - 1
	if pick < 0 {
		it := Item{Kind: kind, Data: data.Data, Ref: data.Ref}
		for _, c := range conns {
			if c != from {
				ch.pushLocal(ctx, c, it, ov)
			}
		}
		return true
	}
	if res, reason := remotes[pick].Send(ctx, ch.name, kind, data, true, ov); res != Queued {
		ch.dropFor(remotes[pick].ID(), reason, data.Lines(), ov)
	}
	return true
}

// nthBit returns the index of the k-th (from 0) bit set in set, which has more than k.
func nthBit(set []uint64, k int) int {
	for w, word := range set {
		if n := bits.OnesCount64(word); k >= n {
			k -= n
			continue
		}
		for range k {
			word &= word - 1 // clear the lowest bit set
		}
		return w*64 + bits.TrailingZeros64(word)
	}
	panic("router: fewer candidates than counted")
}

// Deliver hands a line received from a peer to every local connection of channel.
// done is referenced once per connection and released when that connection has
// written the line or counted it dropped; the caller keeps (and releases) its own
// reference. Deliver may block under the Block policy, which is the intended
// backpressure on the peer link; it never waits for acknowledgements.
//
// It returns the channel's maxWait: how long the peer link may hold the line's
// acknowledgement for a slow local reader before acknowledging it anyway.
func (r *Router) Deliver(ctx context.Context, channel string, kind Kind, data []byte, done *Completion) time.Duration {
	return r.DeliverBatch(ctx, channel, kind, []buffer.Payload{{Data: data}}, done)
}

// DeliverBatch is Deliver for consecutive lines of one channel and kind: the channel is
// looked up, and each connection's queue locked, once per batch. done covers them all.
func (r *Router) DeliverBatch(ctx context.Context, channel string, kind Kind, data []buffer.Payload, done *Completion) time.Duration {
	ch := r.Channel(channel)
	if ch == nil {
		r.Drop(channel, ReasonNoChannel, len(data))
		return 0
	}
	spec := ch.spec.Load()
	conns := *ch.conns.Load()
	if len(conns) == 0 && spec.Delivery == discovery.AnyOne && done != nil {
		// An AnyOne line is for any one member: keep it unacknowledged for the next
		// connection, or for its sender to reroute (park.go). (A sender sends runs
		// only of Broadcast lines, but its spec may be a moment older than this one.)
		if conns = ch.park(kind, buffer.SplitRuns(data, kind.Delimiter()), done, spec.Overflow); len(conns) == 0 {
			return spec.Overflow.MaxWait
		}
	}
	if len(conns) == 0 {
		// Counted so that a line a peer carried here never vanishes without a trace,
		// although for Broadcast no connection means nobody to deliver to.
		ch.drop(ReasonNoConnection, countLines(data))
		return 0
	}
	// A run goes as it is only to connections of its own kind, which write it as it is;
	// any other gets its lines one by one, to translate (split once, if needed).
	var split []buffer.Payload
	for _, c := range conns {
		d := data
		if c.Kind != kind {
			if split == nil {
				split = buffer.SplitRuns(data, kind.Delimiter())
			}
			d = split
		}
		// The caller's own reference keeps done from completing while refs are taken.
		done.Add(len(d))
		if n := ch.pushBatch(ctx, c, kind, d, done, spec.Overflow); n > 0 {
			done.Add(-n)
		}
	}
	return spec.Overflow.MaxWait
}

// Message is a line in flight between a sender and a peer link.
type Message struct {
	Channel string
	Kind    Kind
	Data    []byte
}

// Reroute routes AnyOne lines that a failed or restarted remote never acknowledged to
// the next candidates, in order, in one background goroutine.
func (r *Router) Reroute(msgs []Message) {
	if len(msgs) == 0 {
		return
	}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		for _, m := range msgs {
			ch := r.Channel(m.Channel)
			if ch == nil {
				r.Drop(m.Channel, ReasonNoChannel, 1)
				continue
			}
			ch.routeAnyOne(r.ctx, nil, m.Kind, buffer.Payload{Data: m.Data}, ch.spec.Load().Overflow)
		}
	}()
}
