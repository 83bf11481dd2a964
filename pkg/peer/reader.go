package peer

import (
	"encoding/binary"
	"errors"
	"io"
	"slices"
	"sync/atomic"
	"time"

	"github.com/podipc/podipc/internal/buffer"
)

// Reader splits a stream into frames. It reads straight into reference-counted chunks
// (buffer.Chunk) and returns every frame that fits one in place, so the receiving
// sidecar queues a line's bytes for its local readers without copying them: the caller
// retains the frame's chunk (Chunk) for as long as it keeps the frame.
type Reader struct {
	src *source
	// max is the frame bound; atomic so that the server can lower or raise it when the
	// channels a link carries change, while the link's goroutine reads.
	max atomic.Int32
	// chunk is the buffer being filled (buf is its bytes), holding the reader's own
	// reference; buf[r:w] is read but not yet returned. A full chunk is never reused
	// by the reader: it takes a new one, carrying over the partial frame at its end,
	// and releases the old one, which lives on while queued lines alias it.
	chunk *buffer.Chunk
	buf   []byte
	r, w  int
	// cur is the chunk of the frame returned last; nil for a frame too large for a
	// chunk, which gets a buffer of its own.
	cur *buffer.Chunk
	// quiet is set when the last read returned less than quietRead bytes. A reader
	// with nothing to carry over whose last read was small and came quietWait or more
	// after the one before it is on an idle link (keepalives, a few lines a second): it
	// takes a small chunk to wait in, so that a quiet link waits in 1 KiB rather than
	// 64 KiB. A busy link whose reads happen to be small keeps its full chunk: small
	// chunks there would cut its lines into short runs per chunk, which every queue
	// then retains and releases run by run. A read that fills the small chunk means
	// traffic: the next chunk is a full one.
	quiet bool
}

// minRead is the least room a read is offered: a chunk with less left is replaced.
// A small chunk is replaced when it has less than a quarter of itself left.
const minRead = 4 << 10

// quietRead: a read returning fewer bytes than this found the stream quiet.
const quietRead = 512

// quietWait: reads this far apart, the last of them small, mean an idle link.
const quietWait = 100 * time.Millisecond

// source is what the Reader reads from. With a timeout set it pushes the connection's
// read deadline forward before each read from the socket, that is once per buffer
// refill (hundreds of small frames) rather than once per frame, which cost a clock read
// and a runtime timer update per line.
type source struct {
	r       io.Reader
	conn    interface{ SetReadDeadline(time.Time) error }
	timeout time.Duration
	// now is the clock (time.Now; a test's own); last is when the last read began.
	now  func() time.Time
	last time.Time
}

func (s *source) Read(p []byte) (int, error) {
	s.last = s.now()
	if s.conn != nil {
		_ = s.conn.SetReadDeadline(s.last.Add(s.timeout))
	}
	return s.r.Read(p)
}

// idle tells whether the last read began quietWait or more ago: it waited that long
// for the stream. The caller's own work between two reads takes microseconds; when it
// takes longer (a full queue under Block), the next read waits in a small chunk that
// the backlog then fills, and the one after it is a full chunk again.
func (s *source) idle() bool { return s.now().Sub(s.last) >= quietWait }

// NewReader reads frames of at most maxFrame bytes from r. Close releases its buffer.
func NewReader(r io.Reader, maxFrame int) *Reader {
	fr := &Reader{src: &source{r: r, now: time.Now}, quiet: true}
	fr.SetMax(maxFrame)
	return fr
}

// SetReadTimeout makes every read from the stream fail if conn (the stream's
// connection) delivers nothing for d: the deadline is refreshed before each read from
// the socket. d = 0 stops refreshing it.
func (r *Reader) SetReadTimeout(conn interface{ SetReadDeadline(time.Time) error }, d time.Duration) {
	r.src.conn, r.src.timeout = conn, d
	if d == 0 {
		r.src.conn = nil
	}
}

// SetMax changes the frame bound; it may be called while another goroutine reads.
func (r *Reader) SetMax(n int) { r.max.Store(int32(min(n, MaxFrameBytes))) }

// Next returns the next frame's type and body. The body is valid until the next call,
// or for as long as the caller holds a reference on Chunk().
func (r *Reader) Next() (FrameType, []byte, error) {
	for {
		if r.w-r.r >= 4 {
			n := int(binary.BigEndian.Uint32(r.buf[r.r:]))
			if bound := int(r.max.Load()); n < 1 || n > bound {
				// checkLength builds the error; the test is repeated here because
				// the call cost a tenth of a frame's decoding.
				return 0, nil, checkLength(n, bound)
			}
			if 4+n > buffer.ChunkSize {
				return r.large(n)
			}
			if r.w-r.r >= 4+n {
				f := r.buf[r.r : r.r+4+n : r.r+4+n]
				r.r += 4 + n
				r.cur = r.chunk
				return FrameType(f[4]), f[headerLen:], nil
			}
		}
		if err := r.fill(); err != nil {
			if errors.Is(err, io.EOF) && r.w > r.r {
				err = io.ErrUnexpectedEOF
			}
			return 0, nil, err
		}
	}
}

// fill reads more of the stream, into a new chunk if the current one is short of room.
func (r *Reader) fill() error {
	small := r.quiet && r.r == r.w && (r.chunk == nil || r.src.idle())
	if r.chunk == nil || len(r.buf)-r.w < min(minRead, len(r.buf)/4) || (small && len(r.buf) > buffer.SmallChunkSize) {
		var next *buffer.Chunk
		if small {
			next = buffer.NewSmallChunk()
		} else {
			next = buffer.NewChunk()
		}
		buf := next.Bytes()
		r.w = copy(buf, r.buf[r.r:r.w])
		r.r = 0
		r.chunk.Release(1)
		r.chunk, r.buf = next, buf
	}
	n, err := r.src.Read(r.buf[r.w:])
	r.w += n
	r.quiet = n < quietRead
	if n > 0 {
		return nil
	}
	if err == nil {
		err = io.ErrNoProgress
	}
	return err
}

// checkLength checks a frame's declared length against the bound.
func checkLength(n, bound int) error {
	if n < 1 {
		return protocolError(ReasonMalformed, "empty frame")
	}
	if n > bound {
		return protocolError(ReasonFrameSize, "frame of %d bytes, the bound is %d", n, bound)
	}
	return nil
}

// large reads a frame of n bytes after its length, too large for a chunk, into a buffer
// of its own.
func (r *Reader) large(n int) (FrameType, []byte, error) {
	head := r.buf[r.r+4 : min(r.w, r.r+4+n)]
	r.r += 4 + len(head)
	f, err := readBody(r.src, head, n)
	if err != nil {
		return 0, nil, err
	}
	r.cur = nil
	return FrameType(f[0]), f[1:], nil
}

// readBody returns the n bytes of a frame after its length, of which head were read
// already. The buffer starts small and doubles with what arrives, never allocated to
// the declared length up front: a peer that announces a large frame (or a 64 KiB
// HELLO) and sends little costs little.
func readBody(src io.Reader, head []byte, n int) ([]byte, error) {
	const first = 4 << 10
	f := make([]byte, len(head), max(min(n, first), len(head)))
	copy(f, head)
	for len(f) < n {
		if len(f) == cap(f) {
			f = slices.Grow(f, min(n, 2*cap(f))-len(f))
		}
		m, err := src.Read(f[len(f):min(cap(f), n)])
		f = f[:len(f)+m]
		if err != nil && len(f) < n {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
	return f, nil
}

// ReadHandshake reads one frame of at most maxFrame bytes straight from r, with no
// read-ahead and no buffer before its length has arrived: HELLO and WELCOME are read
// this way, before the peer is authenticated, so an idle connection holds no read
// buffer. The Reader takes over after the handshake.
func ReadHandshake(r io.Reader, maxFrame int) (FrameType, []byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := int(binary.BigEndian.Uint32(hdr[:]))
	if err := checkLength(n, maxFrame); err != nil {
		return 0, nil, err
	}
	f, err := readBody(r, nil, n)
	if err != nil {
		return 0, nil, err
	}
	return FrameType(f[0]), f[1:], nil
}

// Chunk returns the chunk that the last frame's body lives in, or nil if it has a
// buffer of its own. A caller keeping the body past the next Next retains the chunk.
func (r *Reader) Chunk() *buffer.Chunk { return r.cur }

// Ready reports whether a whole frame is buffered, so that Next returns it without
// reading from the stream (and so without blocking).
func (r *Reader) Ready() bool {
	if r.w-r.r < 4 {
		return false
	}
	return r.w-r.r-4 >= int(binary.BigEndian.Uint32(r.buf[r.r:]))
}

// Close releases the reader's chunk; Next must not be called afterwards.
func (r *Reader) Close() {
	r.chunk.Release(1)
	r.chunk, r.buf, r.r, r.w, r.cur = nil, nil, 0, 0, nil
}
