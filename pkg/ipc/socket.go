package ipc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Socket is a connection seen as two channels of messages: In() yields what the peer
// sends, Out() takes what to send. It runs one reader and one writer goroutine until
// the connection ends and the owner calls Close.
type Socket struct {
	conn net.Conn
	opts options
	in   chan string
	out  chan string

	// closing is closed by Close: the owner is done, so the goroutines must stop
	// delivering to In() and stop discarding Out().
	closing chan struct{}
	// ending is closed by end, the first time anything (EOF, an error, Close) finishes
	// the connection; the writer then flushes what is queued and closes it.
	ending chan struct{}
	// done is closed once the connection is closed; Err is final before that.
	done chan struct{}

	endOnce   sync.Once
	closeOnce sync.Once
	// wg counts the reader and writer goroutines, which Close joins.
	wg sync.WaitGroup

	// mu guards err, which In()'s consumer may read before done is closed.
	mu  sync.Mutex
	err error

	// closeDeadline bounds Close's final flush. It is written before closing is
	// closed and read by the writer after it sees closing, so it needs no lock.
	closeDeadline time.Time
	// closeErr is the final flush's failure when Close asked for it; written by the
	// writer before it exits, read by Close after joining it.
	closeErr error

	malformed atomic.Uint64
	dropped   atomic.Uint64
}

// Dial connects to address on network ("tcp", "tcp4", "tcp6" or "unix") and returns the
// connection as a Socket. ctx bounds the connecting only, not the socket's life.
func Dial(ctx context.Context, network, address string, opts ...Option) (*Socket, error) {
	o, err := resolve(opts)
	if err != nil {
		return nil, err
	}
	if err := checkNetwork(network); err != nil {
		return nil, err
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("ipc: %w", err)
	}
	return newSocket(conn, o), nil
}

// NewSocket wraps a connection that is already established, accepted or dialled by
// other means; the Socket owns it from now on. Invalid options give a Socket that has
// already ended, with Err() saying what is wrong.
func NewSocket(conn net.Conn, opts ...Option) *Socket {
	o, err := resolve(opts)
	if err != nil {
		// Negative sizes would make make() panic; the socket never uses its buffers.
		o.inBuffer, o.outBuffer = 0, 0
		s := build(conn, o)
		s.end(err)
		close(s.in)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.finish()
		}()
		return s
	}
	return newSocket(conn, o)
}

func build(conn net.Conn, o options) *Socket {
	return &Socket{
		conn:    conn,
		opts:    o,
		in:      make(chan string, o.inBuffer),
		out:     make(chan string, o.outBuffer),
		closing: make(chan struct{}),
		ending:  make(chan struct{}),
		done:    make(chan struct{}),
	}
}

// newSocket starts a socket with options already checked.
func newSocket(conn net.Conn, o options) *Socket {
	s := build(conn, o)
	s.wg.Add(2)
	go s.readLoop()
	go s.writeLoop()
	return s
}

// In yields the messages the peer sends, in order. It is closed when the connection
// ends, after the messages already read (they stay readable). While it is full the
// socket stops reading, so the peer is slowed down rather than memory growing.
func (s *Socket) In() <-chan string { return s.in }

// Out takes messages to send, in order. The library never closes it. Messages queued
// together are written with one syscall, and each batch is flushed as soon as the
// channel is empty. After the socket has ended, sends are discarded (never blocking)
// until the owner calls Close; after Close, select on Done() when sending.
func (s *Socket) Out() chan<- string { return s.out }

// Conn returns the underlying connection, for its addresses and credentials. Reading or
// writing it directly races with the socket's goroutines.
func (s *Socket) Conn() net.Conn { return s.conn }

// Done is closed when the connection has ended, for whatever reason.
func (s *Socket) Done() <-chan struct{} { return s.done }

// Err says why the socket ended: nil while it runs and after a clean close by either
// side, otherwise the read or write error (for example one wrapping ErrMessageTooLarge,
// a reset, or a write timeout). It is final once In() or Done() is closed.
func (s *Socket) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Malformed returns how many NodeIPC frames the socket received and skipped because
// they were not JSON objects with a string "type".
func (s *Socket) Malformed() uint64 { return s.malformed.Load() }

// Dropped returns how many messages taken from Out() were not written: too large (not
// for Raw), not frameable, or sent after the socket ended.
func (s *Socket) Dropped() uint64 { return s.dropped.Load() }

// Close ends the socket if it has not ended, flushes queued output for at most the
// write timeout, closes the connection, and waits for the socket's goroutines to exit.
// It is idempotent; every call returns the first call's result, which is non-nil only if
// queued output could not be flushed.
func (s *Socket) Close() error {
	s.closeOnce.Do(func() {
		if wt := s.opts.writeTimeout; wt > 0 {
			s.closeDeadline = time.Now().Add(wt)
			// Cut short a write already blocked on a peer that does not read. The
			// connection may be closed already, which is fine.
			_ = s.conn.SetWriteDeadline(s.closeDeadline)
		}
		close(s.closing)
		s.end(nil)
		s.wg.Wait()
	})
	return s.closeErr
}

// end records why the connection finished, the first time only, and starts the
// shutdown. EOF and a use of the closed connection are clean ends, reported as nil.
func (s *Socket) end(err error) {
	s.endOnce.Do(func() {
		if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
			err = nil
		}
		s.mu.Lock()
		s.err = err
		s.mu.Unlock()
		close(s.ending)
	})
}

// readBatch bounds how many messages readLoop converts before handing them to In().
const readBatch = 128

// readLoop turns the connection's bytes into strings on In(). The conversion is the only
// allocation per message. Messages that are already complete in the read buffer are
// converted together and then sent in a row: a consumer woken by the first finds the
// rest waiting instead of parking again after each one, which is what costs the most
// when reader and consumer run on different cores. The loop never waits for more input
// while it holds converted messages, so batching adds no delay.
func (s *Socket) readLoop() {
	defer s.wg.Done()
	// Err must be recorded before In() closes: consumers check it after their range loop.
	defer close(s.in)
	r := NewReader(s.conn, s.opts.framing, s.opts.maxMessage)
	batch := make([]string, 0, readBatch)
	for {
		msg, err := r.Next()
		switch {
		case err == nil:
			batch = append(batch, string(msg))
		case errors.Is(err, ErrMalformed):
			s.malformed.Add(1)
			s.opts.onError(s, err)
		default:
			// Messages read before the end stay readable.
			s.deliver(batch)
			s.end(err)
			return
		}
		if len(batch) == cap(batch) || (len(batch) > 0 && !r.complete()) {
			if !s.deliver(batch) {
				return
			}
			clear(batch) // drop the references, so delivered strings are the consumer's alone
			batch = batch[:0]
		}
	}
}

// deliver sends msgs to In() in order. It reports false if the owner closed the socket
// first: nobody will read the rest.
func (s *Socket) deliver(msgs []string) bool {
	for _, str := range msgs {
		// Try a plain send first: it is much cheaper than the two-way select below,
		// and In() usually has room.
		select {
		case s.in <- str:
			continue
		default:
		}
		select {
		case s.in <- str:
		case <-s.closing:
			return false
		}
	}
	return true
}

// writeLoop is the connection's only writer. It drains every message already queued
// into one buffer and flushes when the queue is empty, so a busy socket makes one
// syscall per batch and an idle one flushes each message at once.
func (s *Socket) writeLoop() {
	defer s.wg.Done()
	w := NewWriter(deadlineWriter{s}, s.opts.framing)
	for {
		select {
		case msg := <-s.out:
			s.write(w, msg)
			s.writeQueued(w)
			if err := w.Flush(); err != nil {
				s.end(fmt.Errorf("ipc: write: %w", err))
				s.finish()
				return
			}
		case <-s.ending:
			// Only this goroutine receives from out, so len(out) can only grow: take
			// a snapshot so a busy sender cannot keep the final flush going forever.
			for n := len(s.out); n > 0; n-- {
				s.write(w, <-s.out)
			}
			if err := w.Flush(); err != nil && s.closed() {
				s.closeErr = fmt.Errorf("ipc: flush on close: %w", err)
			}
			s.finish()
			return
		}
	}
}

// writeQueued buffers every message already waiting in Out().
func (s *Socket) writeQueued(w *Writer) {
	for len(s.out) > 0 {
		for n := len(s.out); n > 0; n-- {
			s.write(w, <-s.out)
		}
	}
}

// write buffers one message. A message the socket must not send is dropped and
// reported; an I/O error sticks in the Writer and surfaces at Flush.
func (s *Socket) write(w *Writer, msg string) {
	// Raw has no messages on the wire, only bytes, so the limit (on received chunks)
	// does not apply to what is sent.
	if len(msg) > s.opts.maxMessage && s.opts.framing != Raw {
		s.dropped.Add(1)
		s.opts.onError(s, fmt.Errorf("outgoing message of %d bytes dropped: %w", len(msg), tooLarge(s.opts.maxMessage)))
		return
	}
	if err := w.WriteMessageString(msg); errors.Is(err, ErrUnframeable) {
		s.dropped.Add(1)
		s.opts.onError(s, fmt.Errorf("outgoing message dropped: %w", err))
	}
}

// finish closes the connection (which also stops the reader), publishes the end, and
// then discards sends on Out() until the owner calls Close, so that a sender that has
// not noticed the end never blocks.
func (s *Socket) finish() {
	_ = s.conn.Close() // The outcome is already recorded; a second close error says nothing new.
	close(s.done)
	for {
		select {
		case <-s.out:
			s.dropped.Add(1)
		case <-s.closing:
			return
		}
	}
}

func (s *Socket) closed() bool {
	select {
	case <-s.closing:
		return true
	default:
		return false
	}
}

// deadlineWriter gives every write syscall its own deadline, so a long busy stream is
// not cut off by a deadline set when it started, and Close's deadline bounds the final
// flush.
type deadlineWriter struct{ s *Socket }

func (d deadlineWriter) Write(p []byte) (int, error) {
	if wt := d.s.opts.writeTimeout; wt > 0 {
		deadline := time.Now().Add(wt)
		if d.s.closed() {
			deadline = d.s.closeDeadline
		}
		if err := d.s.conn.SetWriteDeadline(deadline); err != nil {
			return 0, err
		}
	}
	return d.s.conn.Write(p)
}

func checkNetwork(network string) error {
	switch network {
	case "tcp", "tcp4", "tcp6", "unix":
		return nil
	}
	return fmt.Errorf("ipc: unsupported network %q (want tcp, tcp4, tcp6 or unix)", network)
}
