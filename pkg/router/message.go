package router

import (
	"sync/atomic"

	"github.com/podipc/podipc/internal/buffer"
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

// Delimiter returns the byte that ends a message of kind k on an app connection: '\n'
// for a line, '\f' for a node-ipc frame. Neither occurs inside a message of its kind
// (a line is split at '\n'; JSON has no raw '\f'), which lets a run of messages travel
// as the bytes an app connection carries.
func (k Kind) Delimiter() byte {
	if k == NodeIPC {
		return '\f'
	}
	return '\n'
}

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
	ReasonMemoryBudget  = "memory_budget"   // the sidecar's memory budget stayed full (WaitThenDrop), docs/design.md §8.7
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

// Complete reports whether every reference has been released.
func (c *Completion) Complete() bool { return c.remaining.Load() <= 0 }

// Lines returns how many messages it holds.
func (it *Item) Lines() int { return max(int(it.Run), 1) }

// Item is one message (or run of lines) in a receiver's queue.
type Item struct {
	Kind Kind
	// pins says the queue charged the item for its whole chunk (see Queue.pinLocked).
	// It sits beside Kind, in what would be padding, to keep an Item at 48 bytes: queues
	// write and read one per line.
	pins bool
	// Run is how many lines Data holds when it is a run of them, each ended by '\n',
	// as a RUN frame from a peer carries them (buffer.Payload.Run); 0 when Data is one
	// message without its delimiter. Only Line items are runs, queued only for line
	// connections (Router.DeliverBatch), which write them as they are.
	Run  uint32
	Data []byte
	// Ref keeps the chunk Data lives in from being reused; the queue's owner releases
	// it once the item is written or dropped.
	Ref *buffer.Chunk
	// Done is released once the item has been written or dropped; nil for lines that
	// came from a local app (they need no acknowledgement).
	Done *Completion
}

// settleItems ends the hold of items that leave a queue, written or dropped: it
// releases their completion references and chunk references, one atomic operation per
// run of items sharing a completion or a chunk, and returns their bytes and how many of
// them the queue charged a chunk for (Item.pins), and the lines they hold. It is one
// pass over the items: the writer settles every line it writes, and a loop per job cost
// a pass per job.
func settleItems(items []Item) (bytes, pins, lines int) {
	if len(items) == 0 {
		return 0, 0, 0
	}
	ref, refs := items[0].Ref, 0
	done, dones := items[0].Done, 0
	for i := range items {
		it := &items[i]
		bytes += len(it.Data)
		lines += it.Lines()
		if it.pins {
			pins++
		}
		if it.Ref != ref {
			ref.Release(refs)
			ref, refs = it.Ref, 0
		}
		refs++
		if it.Done != done {
			done.DoneN(dones)
			done, dones = it.Done, 0
		}
		dones++
	}
	ref.Release(refs)
	done.DoneN(dones)
	return bytes, pins, lines
}
