package ipc

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// The accept loop's backoff after an error it can retry (EMFILE and the like): it
// starts at firstAcceptBackoff, doubles on every failure in a row and never waits longer
// than maxAcceptBackoff, net/http's bounds.
const (
	firstAcceptBackoff = 5 * time.Millisecond
	maxAcceptBackoff   = time.Second
)

// Server accepts connections and hands each one out as a Socket on Connections().
type Server struct {
	ln    net.Listener
	opts  options
	conns chan *Socket

	// closing is closed by Close to stop the accept loop, including while it waits for
	// room in conns.
	closing   chan struct{}
	closeOnce sync.Once
	closeErr  error
	// wg counts the accept loop, which Close joins.
	wg sync.WaitGroup
}

// Listen listens on network ("tcp", "tcp4", "tcp6" or "unix") and address, and accepts
// connections until Close. For "unix", a socket file left behind by a process that is
// gone is removed first; one that still answers is an error (its server sees the probe
// as a connection that closes at once), and a file that is not a socket is never
// removed. The options apply to every accepted socket.
func Listen(network, address string, opts ...Option) (*Server, error) {
	o, err := resolve(opts)
	if err != nil {
		return nil, err
	}
	if err := checkNetwork(network); err != nil {
		return nil, err
	}
	if network == "unix" {
		if err := RemoveStale(address); err != nil {
			return nil, err
		}
	}
	// Listen has no context in its signature; the context only bounds the listen call.
	var lc net.ListenConfig
	ln, err := lc.Listen(context.Background(), network, address)
	if err != nil {
		return nil, fmt.Errorf("ipc: %w", err)
	}
	s := &Server{
		ln:      ln,
		opts:    o,
		conns:   make(chan *Socket, o.backlog),
		closing: make(chan struct{}),
	}
	s.wg.Add(1)
	go s.acceptLoop()
	return s, nil
}

// Connections yields each accepted connection as a Socket, which then belongs to the
// receiver (who must Close it). It is closed by Close.
func (s *Server) Connections() <-chan *Socket { return s.conns }

// Addr returns the address the server listens on, with the port chosen for ":0".
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Close stops accepting, closes the sockets accepted but not yet taken from
// Connections(), and closes Connections(). Sockets already taken belong to their owners
// and keep running. A Unix socket file is removed. Close is idempotent.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		close(s.closing)
		if err := s.ln.Close(); err != nil {
			s.closeErr = fmt.Errorf("ipc: %w", err)
		}
		s.wg.Wait()
		// Nobody owns these yet, so nobody else would close them.
		for {
			select {
			case sock := <-s.conns:
				_ = sock.Close() // Never used, so there is no queued output to lose.
			default:
				close(s.conns)
				return
			}
		}
	})
	return s.closeErr
}

func (s *Server) acceptLoop() {
	defer s.wg.Done()
	AcceptLoop(s.ln, s.closing, func(err error) { s.opts.onError(nil, fmt.Errorf("ipc: accept: %w", err)) },
		func(conn net.Conn) bool {
			sock := newSocket(conn, s.opts)
			select {
			case s.conns <- sock:
				return true
			case <-s.closing:
				_ = sock.Close() // Never handed out.
				return false
			}
		})
}

// AcceptLoop accepts connections on ln and hands each to handle, until ln is closed,
// stop is closed, or handle returns false. An error that does not end ln (running out of
// file descriptors and the like) is reported to onError and retried after a backoff that
// starts at 5 ms and doubles up to a second, as net/http does, rather than spin or give
// up. It is the accept loop of Server, and of every listener of the module that serves
// raw connections (the sidecar's endpoints and peer port).
func AcceptLoop(ln net.Listener, stop <-chan struct{}, onError func(error), handle func(net.Conn) bool) {
	var delay time.Duration
	for {
		conn, err := ln.Accept()
		if err != nil {
			if closed(stop) || errors.Is(err, net.ErrClosed) {
				return
			}
			onError(err)
			delay = min(max(2*delay, firstAcceptBackoff), maxAcceptBackoff)
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-stop:
				t.Stop()
				return
			}
			continue
		}
		delay = 0
		if !handle(conn) {
			return
		}
	}
}

// closed reports whether c is closed.
func closed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// RemoveStale removes the Unix socket file at path if nobody answers on it, as node-ipc
// does before it listens, so that a crashed server does not block its successor. A
// socket that still answers is an error (its server sees the probe as a connection that
// closes at once); a missing file, an abstract socket ("@name") and a file that is not a
// socket are left alone. Listen calls it for "unix"; so does every Unix listener of the
// module.
func RemoveStale(path string) error {
	if path == "" || path[0] == '@' {
		return nil // Abstract sockets leave no file.
	}
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode().Type() != fs.ModeSocket {
		// Missing is fine; anything else (not a socket, no permission) is left for
		// listen to report, and never deleted.
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err == nil {
		_ = conn.Close() // Only probed.
		return fmt.Errorf("ipc: listen unix %s: another process is serving it", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return nil // Busy or unreachable: not provably stale, let listen decide.
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("ipc: remove stale socket: %w", err)
	}
	return nil
}
