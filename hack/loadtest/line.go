package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
)

// A measured line is seqDigits decimal digits of its sequence number, a space, filler,
// and '\n'; its size counts the '\n'. A line whose first byte is syncByte is a sync line:
// it proves the path is connected end to end and is never counted.
const (
	seqDigits = 16
	minSize   = seqDigits + 2
	syncByte  = 'S'
)

// newLine returns a line of size bytes carrying sequence number 0.
func newLine(size int) []byte {
	b := make([]byte, size)
	for i := range b {
		b[i] = 'x'
	}
	b[seqDigits] = ' '
	b[size-1] = '\n'
	putSeq(b, 0)
	return b
}

// newSyncLine returns a sync line of size bytes.
func newSyncLine(size int) []byte {
	b := newLine(size)
	b[0] = syncByte
	return b
}

// putSeq writes seq into the first seqDigits bytes of line, in place.
func putSeq(line []byte, seq uint64) {
	for i := seqDigits - 1; i >= 0; i-- {
		line[i] = byte('0' + seq%10)
		seq /= 10
	}
}

// parseSeq reads the sequence number of a line; ok is false if it is not all digits.
func parseSeq(line []byte) (seq uint64, ok bool) {
	if len(line) < seqDigits {
		return 0, false
	}
	for _, c := range line[:seqDigits] {
		if c < '0' || c > '9' {
			return 0, false
		}
		seq = seq*10 + uint64(c-'0')
	}
	return seq, true
}

// checker is the receiving app's verdict on what it reads: every line must have the
// expected size and the next sequence number, so that loss, duplication or reordering
// shows up as an error rather than as a figure. In lossy mode (the overload run) gaps are
// counted instead, but a sequence number going backwards is still an error.
type checker struct {
	size  int
	lossy bool

	// count is the number of data lines received; read by other goroutines while running.
	count atomic.Uint64
	// next is the sequence number expected next; owned by the receiving goroutine.
	next uint64
	// gaps counts lines skipped over in lossy mode; owned by the receiving goroutine.
	gaps uint64

	syncOnce sync.Once
	// synced closes when the first sync line arrives.
	synced chan struct{}

	errMu sync.Mutex
	// err is the first violation seen; once set, later lines are ignored.
	err error
}

func newChecker(size int, lossy bool) *checker {
	return &checker{size: size, lossy: lossy, synced: make(chan struct{})}
}

// consume checks one received line (with its '\n'). It is called from one goroutine.
func (c *checker) consume(line []byte) error {
	if len(line) > 0 && line[0] == syncByte {
		c.syncOnce.Do(func() { close(c.synced) })
		return nil
	}
	if c.failed() {
		return c.Err()
	}
	if len(line) != c.size {
		return c.fail(fmt.Errorf("line after seq %d: got %d bytes, want %d", c.next, len(line), c.size))
	}
	seq, ok := parseSeq(line)
	if !ok {
		return c.fail(fmt.Errorf("line after seq %d: no sequence number in %q", c.next, line[:seqDigits]))
	}
	if seq != c.next {
		if !c.lossy || seq < c.next {
			return c.fail(fmt.Errorf("got seq %d, want %d (loss, duplicate or reorder)", seq, c.next))
		}
		c.gaps += seq - c.next
	}
	c.next = seq + 1
	c.count.Add(1)
	return nil
}

func (c *checker) fail(err error) error {
	c.errMu.Lock()
	defer c.errMu.Unlock()
	if c.err == nil {
		c.err = err
	}
	return c.err
}

func (c *checker) failed() bool { return c.Err() != nil }

// Err returns the first violation seen, or nil.
func (c *checker) Err() error {
	c.errMu.Lock()
	defer c.errMu.Unlock()
	return c.err
}

// errLineTooLong ends a connection whose line does not fit the reader's buffer.
var errLineTooLong = errors.New("line longer than the read buffer")

// lineReader splits a stream into lines without losing a partial line when a read fails
// with a timeout (bufio.Reader.ReadSlice would hand the partial line out and forget it),
// so a read deadline can bound a wait and the read can be retried.
type lineReader struct {
	r          io.Reader
	buf        []byte
	start, end int
	// scanned is how far past start the buffer is known to hold no '\n'.
	scanned int
}

func newLineReader(r io.Reader, size int) *lineReader {
	return &lineReader{r: r, buf: make([]byte, size)}
}

// readLine returns the next line including its '\n'. The slice is valid until the next
// call. On error, buffered bytes stay for the next call.
func (lr *lineReader) readLine() ([]byte, error) {
	for {
		if i := bytes.IndexByte(lr.buf[lr.start+lr.scanned:lr.end], '\n'); i >= 0 {
			n := lr.start + lr.scanned + i + 1
			line := lr.buf[lr.start:n]
			lr.start, lr.scanned = n, 0
			return line, nil
		}
		lr.scanned = lr.end - lr.start
		if lr.start > 0 && lr.end == len(lr.buf) {
			copy(lr.buf, lr.buf[lr.start:lr.end])
			lr.end -= lr.start
			lr.start = 0
		}
		if lr.end == len(lr.buf) {
			return nil, errLineTooLong
		}
		n, err := lr.r.Read(lr.buf[lr.end:])
		lr.end += n
		if err != nil && n == 0 {
			return nil, err
		}
	}
}

// buffered reports the bytes read from the stream but not yet returned.
func (lr *lineReader) buffered() int { return lr.end - lr.start }
