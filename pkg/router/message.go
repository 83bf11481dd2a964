// Package router moves lines between the local app connections of a channel and the peer
// links to the other member pods: it chooses receivers (Broadcast or AnyOne), keeps one
// bounded FIFO queue per receiver, and applies the channel's overflow policy when a
// receiver's queue is full. Every line it does not deliver is counted with a reason.
//
// The data flow is app socket → endpoint → router → peer link → remote router → remote
// endpoint. The router owns no sockets: endpoints feed it lines and drain its queues,
// and peer links implement Remote.
package router

import (
	"sync"
	"sync/atomic"
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

// Done releases one reference.
func (c *Completion) Done() {
	if c == nil {
		return
	}
	if c.remaining.Add(-1) == 0 {
		select {
		case c.notify <- struct{}{}:
		default:
		}
	}
}

// Complete reports whether every reference has been released.
func (c *Completion) Complete() bool { return c.remaining.Load() <= 0 }

// Item is one message in a receiver's queue.
type Item struct {
	Kind Kind
	Data []byte
	// Done is released once the item has been written or dropped; nil for lines that
	// came from a local app (they need no acknowledgement).
	Done *Completion
}

// slabSize is the size of the chunks message bytes are copied into, so the hot path
// allocates once per slab rather than once per line. A slab is freed by the garbage
// collector once no queued item refers to it.
const slabSize = 64 << 10

// Slab copies message bytes into shared chunks. It is not safe for concurrent use; each
// reading goroutine owns one.
type Slab struct{ buf []byte }

// Copy returns a copy of b that stays valid after the caller reuses b.
func (s *Slab) Copy(b []byte) []byte {
	if len(b) > slabSize/4 {
		return append([]byte(nil), b...)
	}
	if cap(s.buf)-len(s.buf) < len(b) {
		s.buf = make([]byte, 0, slabSize)
	}
	start := len(s.buf)
	s.buf = append(s.buf, b...)
	return s.buf[start:len(s.buf):len(s.buf)]
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
