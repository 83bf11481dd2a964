// Package router moves lines between the app connections of a channel in this pod and the
// peer links to the channel's other member pods. It chooses the receivers of each line
// (Broadcast or AnyOne), keeps one bounded FIFO queue per receiver, applies the channel's
// overflow policy when a receiver's queue is full, and counts every line it does not
// deliver with a reason. The design is docs/design.md §5.2 and §8.
//
// # Where it sits
//
// The data flow is app socket → endpoint → router → peer link → remote router → remote
// endpoint → remote app. The router owns no socket and starts no goroutine per line:
// endpoints (pkg/endpoint) hand it the lines their apps write ([Channel.RouteBatch]) and
// drain the [Queue] of each app connection; peer links (pkg/peer) implement [Remote] for
// lines leaving the pod, and hand it the lines arriving from other pods
// ([Router.DeliverBatch]).
//
// # Invariants
//
//   - Order. Lines from one sending connection reach each receiver in the order they were
//     sent: a batch is pushed to each receiver in order, and every receiver has one FIFO
//     queue drained by one writer.
//   - Bounded memory. Every queue is bounded in bytes (the channel's overflow.queueBytes).
//     [Bound] is the one overflow rule, shared by local queues and peer link queues; it
//     owns the queue's byte count and waits on the queue's lock and space signal. Under
//     WaitThenDrop a full queue waits maxWait once per episode and then drops until it is
//     below half; Block waits; Disconnect ends the slow reader.
//   - Nothing lost without a trace. A line that is not queued is counted in
//     podipc_dropped_lines_total with one of the Reason constants, and logged at V(4).
//   - A slow reader never holds the sender. [Router.DeliverBatch] never waits for
//     acknowledgements; it returns the channel's maxWait, after which the peer link
//     acknowledges a line even if a reader still holds it. Only Block, by design, and the
//     judging wait of Disconnect make a pusher wait.
//   - Acknowledgement means written. A [Completion] holds one reference per queue entry of
//     a line from a peer; it completes when every connection has written the line or
//     counted it dropped, and only then may the peer link acknowledge it.
//   - No allocation per line. Line bytes live in reference-counted 64 KiB chunks of
//     internal/buffer, filled by a slab (lines from apps) or by the peer reader (lines from
//     peers); the queues keep them by reference (Item.Ref). The filler
//     holds one reference while it fills a chunk, and each queue holds one per run of lines
//     it keeps; the last release returns the chunk to a pool. Only the fillers and the
//     queues take and release references; one release too many would hand bytes still
//     queued to a new owner.
//   - Lock-free reads on the hot path. A channel's connections and remote members are
//     copy-on-write snapshots: routing reads them without a lock, and [Channel.Attach],
//     [Conn.Detach] and [Channel.SetMembers] replace them under the channel's mutex.
package router
