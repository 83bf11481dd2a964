// Package ipc turns stream connections (TCP or Unix) into channels of messages: the Go
// form of the Clojure libraries async-sockets and clj-ipc, wire compatible with the
// node-ipc npm package.
//
// # Servers, sockets and channels
//
// Listen accepts connections and yields each as a *Socket on Connections(); Dial
// connects and returns one; NewSocket wraps a connection made any other way. A Socket
// has two channels: In() yields each message the peer sends, and Out() takes each
// message to send. Messages are Go strings and may hold any bytes.
//
//	srv, err := ipc.Listen("tcp", "127.0.0.1:7000")
//	if err != nil { … }
//	for sock := range srv.Connections() { // closed when the server closes
//		go func() {
//			defer sock.Close()
//			for line := range sock.In() { // closed when the socket ends
//				sock.Out() <- "ECHO: " + line
//			}
//		}()
//	}
//
// # Framings
//
// Lines (the default) ends each message with '\n' and accepts "\r\n"; an unterminated
// last line at the end of the stream is delivered. NodeIPC is node-ipc's framing: a
// JSON object {"type":…,"data":…} followed by '\f'. Each frame is checked; one that is
// not a JSON object with a string "type" is skipped, counted (Socket.Malformed) and
// reported to the WithErrorHandler function, and the connection stays up, as node-ipc
// and clj-ipc behave. Raw does no framing: In() yields chunks as they arrive, like
// node-ipc's rawBuffer mode. EncodeEvent, DecodeEvent and SocketPath help speak to
// node-ipc; Listen removes a stale Unix socket file first, as node-ipc does. A server
// that frames raw connections itself (with Reader and Writer, as the podipc sidecar
// does) uses the same two pieces Listen is built on: RemoveStale and AcceptLoop, which
// retries accept errors such as running out of file descriptors with backoff.
//
// # Lifetimes
//
// Each socket runs a reader and a writer goroutine. The socket ends when the peer closes
// (a clean end), a read or write fails, a message is too large, or the owner calls
// Close. Then:
//
//   - In() is closed after the messages already read; they stay readable.
//   - Done() is closed, and Err() says why: nil for a clean close by either side.
//   - Out() is never closed by the library. Sends after the end are discarded, never
//     blocking or panicking, until the owner calls Close; after its own Close an owner
//     that may still send selects on Done().
//   - Close is idempotent, flushes queued output for at most the write timeout, closes
//     the connection and joins every goroutine the socket started. The owner must call
//     it, even after the peer has gone.
//
// Server.Close stops accepting and closes Connections(); sockets already taken from it
// belong to their owners.
//
// # Bounds and backpressure
//
// Every buffer is bounded. A message longer than WithMaxMessageBytes (default 64 KiB,
// at most 16 MiB) ends the socket with an error wrapping ErrMessageTooLarge; the reader
// never holds more than that limit, and other sockets are unaffected. A full In() stops
// the reader, so TCP slows the sender down. A full Out() blocks the sender. A write that
// makes no progress for the write timeout ends the socket. Connections() holds at most
// WithBacklog sockets; beyond that the server stops accepting.
//
// # Throughput
//
// The writer drains everything queued in Out() into one buffer before one flush, and
// flushes as soon as Out() is empty, so an idle socket sends each message at once and a
// busy one makes one syscall per batch. The reader reads large blocks and allocates only
// the string of each message. Code that must avoid even that, such as a relay, can use
// Reader and Writer directly: Reader.Next returns each message as a slice of its
// buffer and Writer.WriteMessage frames one into its own, with no channel operation
// and no allocation per message.
package ipc
