package ipc

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Framing says how messages are delimited on the wire.
type Framing int

const (
	// Lines frames each message as a line ended by '\n'. A reader also accepts "\r\n";
	// a writer always writes '\n'. An unterminated last line at end of stream is
	// delivered.
	Lines Framing = iota
	// NodeIPC frames each message as a JSON object {"type":…,"data":…} followed by '\f',
	// the default framing of the node-ipc npm package. A reader yields each valid frame
	// verbatim and reports invalid ones as ErrMalformed without ending the stream.
	NodeIPC
	// Raw does no framing: a reader yields chunks as they arrive (at most the message
	// limit each) and a writer writes messages back to back, like node-ipc's rawBuffer
	// mode.
	Raw
)

// String returns the framing's name.
func (f Framing) String() string {
	switch f {
	case Lines:
		return "Lines"
	case NodeIPC:
		return "NodeIPC"
	case Raw:
		return "Raw"
	}
	return fmt.Sprintf("Framing(%d)", int(f))
}

func (f Framing) valid() bool { return f >= Lines && f <= Raw }

// delimiter is the byte that ends a message in framing f; Raw has none.
func (f Framing) delimiter() byte {
	if f == NodeIPC {
		return '\f'
	}
	return '\n'
}

const (
	// DefaultMaxMessageBytes is the message size limit unless WithMaxMessageBytes says
	// otherwise.
	DefaultMaxMessageBytes = 64 << 10
	// MaxMessageBytesLimit is the largest limit WithMaxMessageBytes accepts. It keeps one
	// misbehaving peer from making a socket hold more than this much memory.
	MaxMessageBytesLimit = 16 << 20

	// readBufferSize is the Reader's initial buffer. Large reads are what make the
	// reader cheap per message: one syscall serves hundreds of short lines.
	readBufferSize = 64 << 10
	// writeBufferSize is the Writer's buffer; a batch of queued messages larger than
	// this is written in several syscalls.
	writeBufferSize = 64 << 10

	// maxEmptyReads is how many reads in a row may return no bytes and no error before
	// a Reader gives up with io.ErrNoProgress: a broken io.Reader must not make it spin.
	// bufio uses the same bound.
	maxEmptyReads = 100
)

var (
	// ErrMessageTooLarge means a message exceeded the size limit. A Reader returning it is
	// finished (the stream cannot be resynchronised) and a Socket ends with it. The
	// error returned wraps it and names the limit.
	ErrMessageTooLarge = errors.New("ipc: message too large")

	// ErrMalformed means a NodeIPC frame is not a JSON object with a string "type". It is
	// not fatal: the frame is skipped and the caller may call Reader.Next again.
	ErrMalformed = errors.New("ipc: malformed node-ipc frame")

	// ErrUnframeable means a Writer was asked to write a message its framing cannot
	// carry: a Lines message containing '\n', or a NodeIPC message that is not a JSON
	// object with a string "type". Nothing is written; the writer stays usable.
	ErrUnframeable = errors.New("ipc: message cannot be framed")
)

// tooLarge builds the error for a message over limit bytes.
func tooLarge(limit int) error {
	return fmt.Errorf("%w: longer than the limit of %d bytes", ErrMessageTooLarge, limit)
}

// Reader splits a byte stream into messages without a copy or an allocation per message.
// It is not safe for concurrent use.
type Reader struct {
	r     io.Reader
	f     Framing
	max   int
	delim byte

	// buf[start:end] is read but not yet returned. Bytes in buf[start:scanned] are
	// known to hold no delimiter, so a long message arriving in pieces is scanned once.
	buf     []byte
	start   int
	end     int
	scanned int

	// err is the first error from r (or ErrMessageTooLarge); it is returned once the
	// buffered messages are used up, and again on every later call.
	err error
	// done is set once err has been returned, so an unterminated tail is delivered
	// only once.
	done bool
}

// NewReader returns a Reader of messages framed by f from r. maxMessageBytes bounds a
// message (and so the Reader's memory); zero or less means DefaultMaxMessageBytes, and
// values above MaxMessageBytesLimit are lowered to it.
func NewReader(r io.Reader, f Framing, maxMessageBytes int) *Reader {
	if maxMessageBytes <= 0 {
		maxMessageBytes = DefaultMaxMessageBytes
	}
	maxMessageBytes = min(maxMessageBytes, MaxMessageBytesLimit)
	size := readBufferSize
	if f == Raw {
		// A raw chunk is at most one message, so a larger buffer would be wasted.
		size = min(size, maxMessageBytes)
	}
	return &Reader{r: r, f: f, max: maxMessageBytes, delim: f.delimiter(), buf: make([]byte, size)}
}

// Buffered returns how many bytes are read but not yet returned by Next. A caller that
// batches work can keep calling Next while Buffered is positive without blocking on a
// read (unless only part of a message is buffered).
func (r *Reader) Buffered() int { return r.end - r.start }

// complete reports whether the next call to Next will return a message without reading
// from the underlying reader. It remembers where it looked, so Next does not scan the
// same bytes again. Raw chunks are never held back, so Raw reports false.
func (r *Reader) complete() bool {
	if r.f == Raw || r.done {
		return false
	}
	i := bytes.IndexByte(r.buf[r.scanned:r.end], r.delim)
	if i < 0 {
		r.scanned = r.end
		return false
	}
	r.scanned += i
	return true
}

// Next returns the next message, without its delimiter (and without the '\r' of a Lines
// "\r\n"). The slice is valid only until the next call. At a clean end of stream an
// unterminated last message is returned first, then io.EOF. After any other read error
// a partial message is dropped and the error is returned. An error wrapping ErrMalformed
// (NodeIPC only) skips one frame and is not sticky; every other error is.
func (r *Reader) Next() ([]byte, error) {
	if r.f == Raw {
		return r.nextRaw()
	}
	if r.done {
		return nil, r.err
	}
	for {
		if i := bytes.IndexByte(r.buf[r.scanned:r.end], r.delim); i >= 0 {
			i += r.scanned
			msg := r.buf[r.start:i]
			r.start, r.scanned = i+1, i+1
			return r.frame(msg)
		}
		r.scanned = r.end
		if r.err != nil {
			return r.tail()
		}
		// No delimiter: everything pending belongs to one message. One byte of slack
		// lets a Lines message of exactly max bytes be followed by "\r\n".
		if r.end-r.start > r.max+r.slack() {
			r.err, r.done = tooLarge(r.max), true
			return nil, r.err
		}
		r.fill()
	}
}

// slack is how many bytes of a complete message's terminator may precede its final
// delimiter: the '\r' of a Lines "\r\n".
func (r *Reader) slack() int {
	if r.f == Lines {
		return 1
	}
	return 0
}

// frame checks a complete message against the limit and the framing's rules.
func (r *Reader) frame(msg []byte) ([]byte, error) {
	if r.f == Lines {
		msg = trimCR(msg)
	}
	if len(msg) > r.max {
		r.err, r.done = tooLarge(r.max), true
		return nil, r.err
	}
	if r.f == NodeIPC && !validEvent(msg) {
		return nil, malformed(msg)
	}
	return msg, nil
}

// tail runs once the stream has failed or ended: it delivers an unterminated last
// message after a clean end, then returns the error.
func (r *Reader) tail() ([]byte, error) {
	if r.done {
		return nil, r.err
	}
	r.done = true
	if r.start == r.end || !errors.Is(r.err, io.EOF) {
		// A partial message before a failure is not a message the peer finished.
		r.start, r.end, r.scanned = 0, 0, 0
		return nil, r.err
	}
	msg := r.buf[r.start:r.end]
	r.start = r.end
	m, err := r.frame(msg)
	if err != nil && errors.Is(err, ErrMalformed) {
		// The next call reports the end of stream.
		return nil, err
	}
	return m, err
}

// fill reads once into the free end of the buffer, moving pending bytes to the front
// and growing the buffer (up to the limit) when a message needs the room.
func (r *Reader) fill() {
	if r.start > 0 {
		// Pending bytes are at most one partial message, usually a few bytes, so the
		// copy is cheap and keeps the buffer from creeping.
		n := copy(r.buf, r.buf[r.start:r.end])
		r.scanned -= r.start
		r.start, r.end = 0, n
	}
	if r.end == len(r.buf) {
		// The buffer holds one unfinished message. Grow, but never beyond what a message
		// at the limit plus its terminator needs: memory stays bounded by the limit.
		size := min(2*len(r.buf), r.max+r.slack()+1)
		if size <= len(r.buf) {
			size = len(r.buf) + 1 // still caught by the length check in Next
		}
		buf := make([]byte, size)
		copy(buf, r.buf[:r.end])
		r.buf = buf
	}
	for range maxEmptyReads {
		n, err := r.r.Read(r.buf[r.end:])
		r.end += n
		if err != nil {
			r.err = err
			return
		}
		if n > 0 {
			return
		}
	}
	r.err = io.ErrNoProgress
}

// nextRaw returns the bytes of one Read, at most the limit.
func (r *Reader) nextRaw() ([]byte, error) {
	if r.err != nil {
		return nil, r.err
	}
	for range maxEmptyReads {
		n, err := r.r.Read(r.buf)
		if err != nil {
			r.err = err
		}
		if n > 0 {
			return r.buf[:n], nil
		}
		if err != nil {
			return nil, err
		}
	}
	r.err = io.ErrNoProgress
	return nil, r.err
}

func trimCR(b []byte) []byte {
	if n := len(b); n > 0 && b[n-1] == '\r' {
		return b[:n-1]
	}
	return b
}

// malformed describes a rejected NodeIPC frame with enough of it to find the sender's bug.
func malformed(frame []byte) error {
	const show = 64
	if len(frame) > show {
		return fmt.Errorf("%w (%d bytes): %q…", ErrMalformed, len(frame), frame[:show])
	}
	return fmt.Errorf("%w (%d bytes): %q", ErrMalformed, len(frame), frame)
}

// Writer frames messages into a buffer; Flush sends them. It is not safe for concurrent
// use.
type Writer struct {
	bw *bufio.Writer
	f  Framing
}

// NewWriter returns a Writer of messages framed by f to w.
func NewWriter(w io.Writer, f Framing) *Writer {
	return &Writer{bw: bufio.NewWriterSize(w, writeBufferSize), f: f}
}

// WriteMessage buffers msg with its delimiter. It returns an error wrapping
// ErrUnframeable, and writes nothing, if the framing cannot carry msg. Buffer overflow
// writes through to the underlying writer, whose error is returned.
//
// It is not named Write: io.Writer's Write takes any bytes and reports a count, while
// this takes one whole message and either frames all of it or none.
func (w *Writer) WriteMessage(msg []byte) error {
	switch w.f {
	case Lines:
		if bytes.IndexByte(msg, '\n') >= 0 {
			return errLineBreak
		}
	case NodeIPC:
		if !validEvent(msg) {
			return errNotEvent
		}
	}
	if _, err := w.bw.Write(msg); err != nil {
		return err
	}
	return w.delimit()
}

// WriteMessageString is WriteMessage for a string, without converting it to a byte
// slice.
func (w *Writer) WriteMessageString(msg string) error {
	switch w.f {
	case Lines:
		if strings.IndexByte(msg, '\n') >= 0 {
			return errLineBreak
		}
	case NodeIPC:
		if !validEvent(msg) {
			return errNotEvent
		}
	}
	if _, err := w.bw.WriteString(msg); err != nil {
		return err
	}
	return w.delimit()
}

// WriteRun buffers n Lines messages that b holds each ended by '\n' (a run, as a
// connection of this framing carries them): exactly what n calls of WriteMessage would
// buffer, in one copy. It returns an error wrapping ErrUnframeable, and writes nothing,
// unless the framing is Lines and b holds exactly n line breaks, the last its last byte.
func (w *Writer) WriteRun(b []byte, n int) error {
	if w.f != Lines || n < 1 || len(b) == 0 || b[len(b)-1] != '\n' || bytes.Count(b, []byte{'\n'}) != n {
		return errNotRun
	}
	_, err := w.bw.Write(b)
	return err
}

var (
	errNotRun    = fmt.Errorf("%w: not a run of Lines messages each ended by a line break", ErrUnframeable)
	errLineBreak = fmt.Errorf("%w: a Lines message contains a line break", ErrUnframeable)
	errNotEvent  = fmt.Errorf("%w: a NodeIPC message must be a JSON object with a string \"type\"", ErrUnframeable)
)

func (w *Writer) delimit() error {
	if w.f == Raw {
		return nil
	}
	return w.bw.WriteByte(w.f.delimiter())
}

// Flush writes the buffered messages to the underlying writer.
func (w *Writer) Flush() error { return w.bw.Flush() }

// Buffered returns how many bytes are waiting for Flush.
func (w *Writer) Buffered() int { return w.bw.Buffered() }
