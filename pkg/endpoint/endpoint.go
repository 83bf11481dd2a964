// Package endpoint serves a channel to the apps of the pod: a line port (TCP, newline
// framing) and a node-ipc Unix socket (JSON '\f' framing). Each app connection gets one
// reader goroutine, which hands every message to the router, and one writer goroutine,
// which drains the connection's router queue in batches and translates between the
// message kinds at this, the receiving, edge only.
package endpoint

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/ipc"
	"github.com/podipc/podipc/pkg/router"
)

// DefaultMaxConnections is the default cap on the app connections of one endpoint.
const DefaultMaxConnections = 1024

// Options are the limits of an endpoint.
type Options struct {
	// MaxConnections caps the endpoint's open app connections (DefaultMaxConnections if
	// 0): every connection costs two goroutines and read and write buffers, so an app
	// that leaks connections (or loops connecting) must not take the sidecar to its
	// memory limit, which would end every channel of the pod. A connection over the cap
	// is closed at once, without a byte read or written, counted and logged.
	MaxConnections int
	// Refused counts the connections closed over the cap; nil counts nothing.
	Refused prometheus.Counter
}

// Endpoint is one listener of a channel and the app connections it accepted.
type Endpoint struct {
	ch      *router.Channel
	ln      net.Listener
	kind    router.Kind
	framing ipc.Framing
	log     logr.Logger
	opts    Options
	// refusedLogged is when a refused connection was last logged, so that an app
	// looping on connect logs once a second; refused counts those not yet logged.
	refusedLogged time.Time
	refused       int

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	// draining stops readers without closing their connections, so lines from peers
	// are still written while the sidecar drains.
	draining bool
	closed   bool
	wg       sync.WaitGroup
	ctx      context.Context
	cancel   context.CancelFunc
}

// ListenLines binds the channel's line port on address (host:port).
func ListenLines(ch *router.Channel, address string, opts Options, log logr.Logger) (*Endpoint, error) {
	var lc net.ListenConfig
	ln, err := lc.Listen(context.Background(), "tcp", address)
	if err != nil {
		return nil, fmt.Errorf("listen on line port of channel %s: %w", ch.Name(), err)
	}
	return newEndpoint(ch, ln, router.Line, ipc.Lines, opts, log.WithValues("channel", ch.Name(), "address", address)), nil
}

// ListenNodeIPC binds the channel's node-ipc socket at path, removing a stale socket
// file left by a previous sidecar, and gives it the mode SocketMode chooses.
func ListenNodeIPC(ch *router.Channel, path string, opts Options, log logr.Logger) (*Endpoint, error) {
	if err := ipc.RemoveStale(path); err != nil {
		return nil, fmt.Errorf("node-ipc socket of channel %s: %w", ch.Name(), err)
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(context.Background(), "unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on node-ipc socket of channel %s: %w", ch.Name(), err)
	}
	mode := SocketMode(filepath.Dir(path))
	if err := os.Chmod(path, mode); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("set the mode of node-ipc socket %s: %w", path, err)
	}
	log = log.WithValues("channel", ch.Name(), "socket", path)
	log.V(1).Info("Bound node-ipc socket", "mode", mode.String())
	return newEndpoint(ch, ln, router.NodeIPC, ipc.NodeIPC, opts, log), nil
}

// SocketMode returns the mode of the node-ipc sockets in dir: a client needs write
// permission on a socket to connect. The sockets live in a volume shared by the pod's
// containers only, which may run as different users. When the pod has an fsGroup, the
// kubelet gives the volume that group with the set-group-ID bit, so every socket
// created in it has the group every container of the pod is in: read and write for
// owner and group (0660) are then enough, and no other user of the node's
// filesystem can connect. Without one, a container running as another user and group
// can connect only if others may write (0666): the same trust as the line port, which
// every container of the pod can reach on localhost.
func SocketMode(dir string) fs.FileMode {
	if fi, err := os.Stat(dir); err == nil && fi.Mode()&fs.ModeSetgid != 0 {
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Gid != 0 {
			return 0o660
		}
	}
	return 0o666
}

func newEndpoint(ch *router.Channel, ln net.Listener, kind router.Kind, f ipc.Framing, opts Options, log logr.Logger) *Endpoint {
	if opts.MaxConnections <= 0 {
		opts.MaxConnections = DefaultMaxConnections
	}
	e := &Endpoint{ch: ch, ln: ln, kind: kind, framing: f, opts: opts, log: log, conns: map[net.Conn]struct{}{}}
	// ctx bounds what the readers wait for (routing under the overflow policy) and how
	// long a drained connection stays open; Close ends it.
	e.ctx, e.cancel = context.WithCancel(context.Background())
	return e
}

// Addr returns the listening address.
func (e *Endpoint) Addr() net.Addr { return e.ln.Addr() }

// Start accepts app connections until ctx ends or Shutdown or Close is called, and
// returns once the listener is closed. When ctx ends it closes the endpoint as Close
// does, and returns after every connection's goroutines have ended. An endpoint that
// was closed returns net.ErrClosed.
func (e *Endpoint) Start(ctx context.Context) error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return net.ErrClosed
	}
	e.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { _ = e.ln.Close() })
	defer stop()
	e.acceptLoop()
	if ctx.Err() != nil {
		return e.Close()
	}
	return nil
}

// acceptLoop accepts app connections until the listener is closed (ipc.AcceptLoop
// backs off after errors such as running out of file descriptors).
func (e *Endpoint) acceptLoop() {
	ipc.AcceptLoop(e.ln, e.ctx.Done(), func(err error) { e.log.Error(err, "Accepting app connection failed") },
		func(conn net.Conn) bool {
			e.admit(conn)
			return true
		})
}

// admit serves conn, unless the endpoint is closing or at its connection cap.
func (e *Endpoint) admit(conn net.Conn) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed || e.draining {
		_ = conn.Close()
		return
	}
	if len(e.conns) >= e.opts.MaxConnections {
		e.refuseLocked(conn)
		return
	}
	e.conns[conn] = struct{}{}
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		e.serve(conn)
	}()
}

// refuseLocked closes conn, accepted over the connection cap, counts it and logs it
// (at most once a second, with the number refused since the last log).
func (e *Endpoint) refuseLocked(conn net.Conn) {
	_ = conn.Close()
	if e.opts.Refused != nil {
		e.opts.Refused.Inc()
	}
	e.refused++
	if now := time.Now(); now.Sub(e.refusedLogged) >= time.Second {
		e.log.Info("Refused app connections over the connection cap", "reason", "connection_limit",
			"maxConnections", e.opts.MaxConnections, "refused", e.refused, "remote", conn.RemoteAddr().String())
		e.refusedLogged, e.refused = now, 0
	}
}

// serve runs one app connection until it ends.
func (e *Endpoint) serve(conn net.Conn) {
	c := e.ch.Attach(e.kind, conn.RemoteAddr().String(), func() { _ = conn.Close() })
	writerDone := make(chan struct{})
	stop := make(chan struct{})
	go func() {
		defer close(writerDone)
		e.writeLoop(conn, c, stop)
	}()
	err := e.readLoop(conn, c)
	e.mu.Lock()
	draining := e.draining && !e.closed
	e.mu.Unlock()
	if draining {
		// Keep writing lines from peers until Close.
		<-e.ctx.Done()
	}
	close(stop)
	_ = conn.Close()
	<-writerDone
	c.Detach()
	e.mu.Lock()
	delete(e.conns, conn)
	e.mu.Unlock()
	if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !errors.Is(err, os.ErrDeadlineExceeded) {
		e.log.Error(err, "Closed app connection")
	}
}

// readLoop hands each message to the router until the connection ends. An app that
// closes its sending side ends its connection (lines queued for it are dropped).
//
// Lines are routed in batches: everything the reader has buffered is collected, and
// the batch is routed just before the reader would block on the socket again (or when
// it is full), so that a buffer of short lines costs one lock per receiver rather than
// one per line, without holding back a line that is complete.
func (e *Endpoint) readLoop(conn net.Conn, c *router.Conn) error {
	src := &batchingReader{conn: conn}
	r := ipc.NewReader(src, e.framing, e.ch.Spec().MaxMessageBytes)
	var slab buffer.Slab
	defer slab.Close()
	// The reader's buffer and the slab's chunk count against the memory budget.
	budget := e.ch.Budget()
	budget.Add(readBufferBytes)
	defer budget.Add(-readBufferBytes)
	src.flush = func() {
		e.ch.RouteBatch(e.ctx, c, e.kind, src.batch)
		slab.Recycle() // the queues took their own references
		clear(src.batch)
		src.batch = src.batch[:0]
	}
	defer src.route() // before slab.Close
	malformed := 0
	// Each line is copied with its delimiter after it, so that a read's lines lie in
	// the chunk as the app sent them and a peer link sends them as one run
	// (buffer.Run).
	delim := e.kind.Delimiter()
	for {
		msg, err := r.Next()
		if err != nil {
			if errors.Is(err, ipc.ErrMalformed) {
				// The app's frame is lost, not its connection: counted, and logged in
				// full for the first of a connection only, so a broken client cannot
				// flood the log.
				malformed++
				e.ch.Drop(router.ReasonMalformed, 1)
				log := e.log.V(1)
				if malformed == 1 {
					log = e.log
				}
				log.Info("Skipped malformed node-ipc frame", "conn", conn.RemoteAddr().String(), "reason", router.ReasonMalformed,
					"skipped", malformed, "err", err.Error())
				continue
			}
			if errors.Is(err, ipc.ErrMessageTooLarge) {
				return fmt.Errorf("app sent a message longer than maxMessageBytes (%d) of channel %s: %w",
					e.ch.Spec().MaxMessageBytes, e.ch.Name(), err)
			}
			return err
		}
		src.batch = append(src.batch, slab.CopyLine(msg, delim))
		if len(src.batch) == maxBatch {
			src.route()
		}
	}
}

// maxBatch bounds the lines routed at once, so that the first lines of a large buffer
// are not held back for long.
const maxBatch = 256

// readBufferBytes is what one app connection's reading side holds while it is open,
// charged to the memory budget: the ipc.Reader's buffer and the slab's current chunk.
const readBufferBytes = 2 * buffer.ChunkSize

// batchingReader is an app connection as its reader sees it: before every read from
// the socket, which may block, it routes the lines collected so far.
type batchingReader struct {
	conn  net.Conn
	batch []buffer.Payload
	flush func()
}

func (b *batchingReader) Read(p []byte) (int, error) {
	b.route()
	return b.conn.Read(p)
}

func (b *batchingReader) route() {
	if len(b.batch) > 0 {
		b.flush()
	}
}

// writeTimeout bounds the writing of one batch to an app: an app that reads nothing for
// this long loses its connection (and the lines queued for it, counted). A variable so
// that a test can shorten it.
var writeTimeout = time.Minute

// writeLoop writes whatever is queued for the connection in one batch per wakeup.
func (e *Endpoint) writeLoop(conn net.Conn, c *router.Conn, stop <-chan struct{}) {
	w := ipc.NewWriter(conn, e.framing)
	var items, unframeable []router.Item
	var scratch bytes.Buffer
	// dropped counts the connection's unframeable messages: a peer can send any number,
	// so only the first is logged at info level.
	dropped := 0
	for {
		select {
		case <-c.Queue.Ready():
		case <-stop:
			return
		}
		items = c.Queue.Take(items[:0])
		if len(items) == 0 {
			continue
		}
		// Before the first byte: a batch larger than the ipc.Writer's buffer writes
		// through while it is encoded, not only at the flush.
		_ = conn.SetWriteDeadline(time.Now().Add(writeTimeout))
		var err error
		// Messages this connection's framing cannot carry are moved out of items,
		// which keeps those written, in place.
		kept, i := 0, 0
		for ; i < len(items); i++ {
			if items[i].Run > 0 {
				// A run of lines from a peer, queued only for a line connection: as
				// the connection carries it, in one copy.
				err = w.WriteRun(items[i].Data, int(items[i].Run))
			} else {
				err = e.write(w, items[i], &scratch)
			}
			if errors.Is(err, ipc.ErrUnframeable) {
				dropped++
				log := e.log.V(1)
				if dropped == 1 {
					log = e.log
				}
				log.Info("Dropped a message this connection cannot carry", "conn", c.Name(),
					"reason", router.ReasonUnframeable, "dropped", dropped, "err", err.Error())
				unframeable = append(unframeable, items[i])
				// Only that message is dropped: the connection goes on, also when it
				// was the batch's last (err would otherwise close the connection).
				err = nil
				continue
			}
			if err != nil {
				break
			}
			items[kept] = items[i]
			kept++
		}
		if err == nil {
			err = w.Flush()
		}
		if err != nil {
			// Whether the buffered part reached the app is unknown; count the whole
			// batch as dropped so nothing is acknowledged that may be lost.
			c.Failed(items[:kept], router.ReasonClosed)
			c.Failed(items[i:], router.ReasonClosed) // items[kept:i] were moved
			c.Failed(unframeable, router.ReasonUnframeable)
			clear(items)
			clear(unframeable)
			_ = conn.Close()
			return
		}
		c.Written(items[:kept])
		c.Failed(unframeable, router.ReasonUnframeable)
		clear(items)
		clear(unframeable)
		unframeable = unframeable[:0]
	}
}

// write translates one item to the connection's kind and buffers it.
func (e *Endpoint) write(w *ipc.Writer, it router.Item, scratch *bytes.Buffer) error {
	switch {
	case it.Kind == e.kind:
		return w.WriteMessage(it.Data)
	case e.kind == router.Line: // a node-ipc message reaches a line client as compact JSON
		scratch.Reset()
		if err := json.Compact(scratch, it.Data); err != nil {
			return fmt.Errorf("%w: %w", ipc.ErrUnframeable, err)
		}
		return w.WriteMessage(scratch.Bytes())
	default: // a line reaches a node-ipc client as {"type":"message","data":"<line>"}
		ev, err := ipc.EncodeEvent("message", string(it.Data))
		if err != nil {
			return fmt.Errorf("%w: %w", ipc.ErrUnframeable, err)
		}
		return w.WriteMessage(ev)
	}
}

// Shutdown stops accepting and stops reading from the app connections (the lines read
// so far are routed), keeps writing to them what still arrives from peers until ctx
// ends, then closes the endpoint as Close does. An endpoint has no end of its own (a
// peer may send at any time), so it returns when ctx ends or Close is called.
func (e *Endpoint) Shutdown(ctx context.Context) error {
	_ = e.ln.Close()
	e.mu.Lock()
	e.draining = true
	for c := range e.conns {
		_ = c.SetReadDeadline(time.Now())
	}
	e.mu.Unlock()
	select {
	case <-ctx.Done():
	case <-e.ctx.Done():
	}
	return e.Close()
}

// Connections returns the number of open app connections.
func (e *Endpoint) Connections() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.conns)
}

// Close stops accepting, closes every app connection and joins their goroutines.
// Idempotent.
func (e *Endpoint) Close() error {
	e.mu.Lock()
	e.closed = true
	_ = e.ln.Close()
	for c := range e.conns {
		_ = c.Close()
	}
	e.cancel()
	e.mu.Unlock()
	e.wg.Wait()
	if ul, ok := e.ln.(*net.UnixListener); ok {
		_ = os.Remove(ul.Addr().String())
	}
	return nil
}
