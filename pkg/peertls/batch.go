package peertls

import (
	"bufio"
	"crypto/tls"
	"net"
	"sync"
)

// batchConn is the TCP connection under a TLS session. crypto/tls writes every record
// (at most 16 KiB of a line batch) with a system call of its own, and reads a record at
// a time; a peer link writes batches of up to 256 KiB. While a session's Write runs,
// batchConn gathers the records and writes them with one system call when it returns,
// as a plaintext link would, and it buffers reads.
type batchConn struct {
	net.Conn
	r *bufio.Reader

	mu     sync.Mutex
	gather bool
	buf    []byte
}

func newBatchConn(c net.Conn) *batchConn {
	return &batchConn{Conn: c, r: bufio.NewReaderSize(c, 32<<10)}
}

func (c *batchConn) Read(b []byte) (int, error) { return c.r.Read(b) }

// Write gathers b while a session's Write runs; otherwise (the handshake, alerts sent
// by crypto/tls on its own) it writes b at once.
func (c *batchConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gather {
		c.buf = append(c.buf, b...)
		return len(b), nil
	}
	return c.Conn.Write(b)
}

// start begins gathering.
func (c *batchConn) start() {
	c.mu.Lock()
	c.gather = true
	c.mu.Unlock()
}

// flush ends gathering and writes what was gathered.
func (c *batchConn) flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gather = false
	if len(c.buf) == 0 {
		return nil
	}
	_, err := c.Conn.Write(c.buf)
	c.buf = c.buf[:0]
	if cap(c.buf) > 1<<20 {
		c.buf = nil // one very large line grew it
	}
	return err
}

// NetConn returns the connection underneath.
func (c *batchConn) NetConn() net.Conn { return c.Conn }

// session is a TLS session over a batchConn, as handed to pkg/peer.
type session struct {
	*tls.Conn
	raw *batchConn
}

func newSession(tc *tls.Conn, raw *batchConn) *session { return &session{Conn: tc, raw: raw} }

// Write encrypts b into records and writes them in one system call.
func (s *session) Write(b []byte) (int, error) {
	s.raw.start()
	n, err := s.Conn.Write(b)
	if ferr := s.raw.flush(); err == nil {
		err = ferr
	}
	return n, err
}

// Close closes the TCP connection without a close_notify alert, which could wait
// behind a blocked write (pkg/peer closes a connection to end such a write); the
// protocol's GOODBYE, sequence numbers and acknowledgements already tell an orderly end
// from a truncated one.
func (s *session) Close() error { return s.raw.Close() }

// NetConn returns the connection under the TLS session.
func (s *session) NetConn() net.Conn { return s.raw }
