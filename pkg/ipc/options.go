package ipc

import (
	"errors"
	"fmt"
	"time"
)

// Defaults of the options.
const (
	// DefaultBuffer is the default capacity of In(), Out() and Connections(). Large
	// buffers let the reader and writer goroutines move many messages per wake-up.
	DefaultBuffer = 1024
	// DefaultWriteTimeout bounds each write to the connection, and Close's final flush.
	DefaultWriteTimeout = 10 * time.Second
)

// Option configures Listen, Dial and NewSocket.
type Option func(*options)

// options is the resolved configuration. Listen hands the same options to every
// socket it accepts.
type options struct {
	framing      Framing
	maxMessage   int
	backlog      int
	inBuffer     int
	outBuffer    int
	writeTimeout time.Duration
	onError      func(*Socket, error)
}

// WithFraming sets how messages are delimited; the default is Lines.
func WithFraming(f Framing) Option { return func(o *options) { o.framing = f } }

// WithMaxMessageBytes sets the largest message (without delimiter) a socket accepts;
// the default is DefaultMaxMessageBytes. A larger incoming message ends the socket with
// ErrMessageTooLarge; a larger outgoing one is dropped and reported (except with Raw,
// where the limit only caps each received chunk). n must be between 1
// and MaxMessageBytesLimit.
func WithMaxMessageBytes(n int) Option { return func(o *options) { o.maxMessage = n } }

// WithBacklog sets the capacity of Server.Connections(): how many accepted sockets wait
// for the owner before the server stops accepting (and the kernel's backlog fills).
func WithBacklog(n int) Option { return func(o *options) { o.backlog = n } }

// WithInBuffer sets the capacity of Socket.In(). When it is full the socket stops
// reading, so a slow consumer slows the sender (TCP backpressure) instead of growing
// memory.
func WithInBuffer(n int) Option { return func(o *options) { o.inBuffer = n } }

// WithOutBuffer sets the capacity of Socket.Out(). When it is full a send blocks until
// the connection accepts more.
func WithOutBuffer(n int) Option { return func(o *options) { o.outBuffer = n } }

// WithWriteTimeout bounds every write to the connection; a peer that accepts nothing for
// this long ends the socket with a timeout error. Close waits at most this long to flush
// queued output. Zero disables the bound (Close then waits as long as the peer takes).
func WithWriteTimeout(d time.Duration) Option { return func(o *options) { o.writeTimeout = d } }

// WithErrorHandler sets a function told about errors that do not end a socket: a
// malformed NodeIPC frame, an outgoing message that cannot be sent (too large or not
// frameable), or a failed accept (with a nil Socket). It runs on the socket's
// goroutines, so it must return quickly. The default discards the errors; they are still
// counted by Socket.Malformed and Socket.Dropped.
func WithErrorHandler(h func(s *Socket, err error)) Option {
	return func(o *options) { o.onError = h }
}

// resolve applies opts over the defaults and checks the result.
func resolve(opts []Option) (options, error) {
	o := options{
		framing:      Lines,
		maxMessage:   DefaultMaxMessageBytes,
		backlog:      DefaultBuffer,
		inBuffer:     DefaultBuffer,
		outBuffer:    DefaultBuffer,
		writeTimeout: DefaultWriteTimeout,
	}
	for _, opt := range opts {
		if opt != nil {
			opt(&o)
		}
	}
	var errs []error
	if !o.framing.valid() {
		errs = append(errs, fmt.Errorf("unknown framing %v", o.framing))
	}
	if o.maxMessage < 1 || o.maxMessage > MaxMessageBytesLimit {
		errs = append(errs, fmt.Errorf("max message bytes %d is outside 1..%d", o.maxMessage, MaxMessageBytesLimit))
	}
	if o.backlog < 0 || o.inBuffer < 0 || o.outBuffer < 0 {
		errs = append(errs, fmt.Errorf("negative buffer size (backlog %d, in %d, out %d)", o.backlog, o.inBuffer, o.outBuffer))
	}
	if o.writeTimeout < 0 {
		errs = append(errs, fmt.Errorf("negative write timeout %v", o.writeTimeout))
	}
	if o.onError == nil {
		o.onError = func(*Socket, error) {}
	}
	if err := errors.Join(errs...); err != nil {
		return o, fmt.Errorf("ipc: invalid options: %w", err)
	}
	return o, nil
}
