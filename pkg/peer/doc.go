// Package peer is the sidecar-to-sidecar wire protocol and the two ends that speak it: a
// [Link] per remote member pod, which dials that pod's peer port (7701) and carries every
// channel the two pods share, and a [Server], which accepts links from member pods, hands
// their lines to the local router and answers with acknowledgements, presence and
// keepalives. The wire contract is docs/protocol.md; the design is docs/design.md §5.3,
// §5.4 and §8.
//
// # Shape
//
// Data flows one way on a connection, from the dialling sender to the accepting receiver;
// two pods that both send have two connections. Each connection has exactly one writer
// goroutine per side, which writes everything queued in one system call per wakeup. Frames
// are a 4-byte length, a type byte and a body ([FrameType]); the Reader reads them into
// pooled chunks so that lines are queued in place, without a copy or an allocation each.
//
// # Files
//
// frame.go is the codec (frame types, encoders, decoders, their bounds); reader.go reads a
// stream into frames; outbox.go is a link's queue of unacknowledged lines (numbering,
// encoding, acknowledgement, settling), which knows nothing of connections; link.go is the
// outbound session around it (dial, handshake, resume, the read and write loops, the
// lifecycle); server.go is the inbound side.
//
// # Invariants
//
//   - The link's queue is its retransmit queue. A line leaves it only when the receiver
//     acknowledges it (cumulatively, by sequence number), so a reset connection loses
//     nothing while both sidecars live.
//   - Exactly once across a reset. A sidecar is one incarnation (a random number chosen at
//     start). The receiver keeps, per sending pod, the sender's incarnation and the last
//     sequence number it dispatched, beyond the life of any connection; WELCOME returns it
//     and the sender resumes after it. A receiver skips retransmissions and treats a gap as
//     a protocol error. Two connections never deliver for one sender at once: a new one
//     takes over only after the old one has finished dispatching.
//   - A restarted receiver is settled, not replayed. When WELCOME names another incarnation,
//     the lines the old one may have seen (up to the highest sequence number ever written
//     to it) are counted dropped peer_restarted (Broadcast) or rerouted (AnyOne).
//   - Acknowledged means written to every local connection, or maxWait has passed: a slow
//     local reader never holds a sender's window.
//   - Only members connect, and only on shared channels. The receiver authorizes a sender
//     after HELLO by the identity and source IP that discovery reports, and refuses anyone
//     else with REFUSE, a log line and podipc_peer_refused_total. It admits each DATA frame
//     only for a channel both pods share (others are counted dropped not_shared), and tells
//     presence only for those. The sender trusts its receiver no further: an ACK or a
//     WELCOME lastSeq beyond what it sent is a protocol error that ends the link.
//   - Bounded. Every field of every frame is validated once, at decode; a violation is a
//     [ProtocolError] that ends the link, counted in podipc_peer_protocol_errors_total.
//     Before authorization HELLO is read with no buffer ahead of it, under a handshake
//     deadline and the connection caps; afterwards a frame is at most the largest
//     maxMessageBytes of the shared channels plus [DataOverhead]. A link's queue is bounded
//     in bytes per channel under the channel's overflow policy.
//   - Compatible. Release N speaks versions N-1 and N; unknown frame types and trailing
//     bytes in known bodies are ignored, so later versions can add both.
package peer
