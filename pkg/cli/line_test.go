package cli

import (
	"bufio"
	"bytes"
	"context"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// lineServer is a tiny stand-in for the sidecar's line port: it records the lines each
// connection sends, and hands each accepted connection to onConn if set.
type lineServer struct {
	ln     net.Listener
	onConn func(net.Conn)

	mu    sync.Mutex
	conns [][]string // lines received, per connection
	wg    sync.WaitGroup
}

func startLineServer(t *testing.T, onConn func(net.Conn)) *lineServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &lineServer{ln: ln, onConn: onConn}
	s.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Go(func() { s.serve(c) })
		}
	})
	t.Cleanup(func() { _ = ln.Close(); s.wg.Wait() })
	return s
}

func (s *lineServer) serve(c net.Conn) {
	defer func() { _ = c.Close() }()
	if s.onConn != nil {
		s.onConn(c)
		return
	}
	s.mu.Lock()
	i := len(s.conns)
	s.conns = append(s.conns, nil)
	s.mu.Unlock()
	// Record exact bytes: a line without its '\n' terminator is marked "<unterminated>".
	r := bufio.NewReader(c)
	for {
		line, err := r.ReadString('\n')
		if line != "" {
			if l, ok := strings.CutSuffix(line, "\n"); ok {
				line = l
			} else {
				line += "<unterminated>"
			}
			s.mu.Lock()
			s.conns[i] = append(s.conns[i], line)
			s.mu.Unlock()
		}
		if err != nil {
			return
		}
	}
}

func (s *lineServer) port() int { return s.ln.Addr().(*net.TCPAddr).Port }

// received waits until n connections have ended and returns their lines.
func (s *lineServer) received(t *testing.T, n int) [][]string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s.mu.Lock()
		got := len(s.conns)
		s.mu.Unlock()
		if got >= n || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Connections end when the client closes; closing the listener and waiting for the
	// serving goroutines makes every recorded line visible.
	_ = s.ln.Close()
	s.wg.Wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conns
}

func run(ctx context.Context, stdin string, args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = Run(ctx, args, Streams{In: strings.NewReader(stdin), Out: &out, Err: &errb})
	return code, out.String(), errb.String()
}

func TestSend(t *testing.T) {
	tests := map[string]struct {
		stdin string
		args  func(port string) []string
		want  []string
	}{
		"lines as arguments": {
			args: func(p string) []string { return []string{"send", p, "hello", "second line"} },
			want: []string{"hello", "second line"},
		},
		"lines from stdin, CRLF kept as sent, unterminated last line delivered": {
			stdin: "one\ntwo\r\nthree",
			args:  func(p string) []string { return []string{"send", p} },
			want:  []string{"one", "two\r", "three"},
		},
		"--port makes every argument a line": {
			args: func(p string) []string { return []string{"send", "--port", p, "7000", "x"} },
			want: []string{"7000", "x"},
		},
		"--address names the sidecar's address": {
			args: func(p string) []string { return []string{"send", "--address", "127.0.0.1", p, "a"} },
			want: []string{"a"},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			srv := startLineServer(t, nil)
			code, _, stderr := run(t.Context(), tc.stdin, tc.args(strconv.Itoa(srv.port()))...)
			if code != 0 {
				t.Fatalf("exit %d: %s", code, stderr)
			}
			got := srv.received(t, 1)
			if len(got) != 1 || strings.Join(got[0], "|") != strings.Join(tc.want, "|") {
				t.Fatalf("server received %q, want one connection with %q", got, tc.want)
			}
		})
	}
}

func TestSendLargeInput(t *testing.T) {
	srv := startLineServer(t, nil)
	var in strings.Builder
	for i := range 20000 {
		in.WriteString("line " + strconv.Itoa(i) + "\n")
	}
	if code, _, stderr := run(t.Context(), in.String(), "send", strconv.Itoa(srv.port())); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	got := srv.received(t, 1)
	if len(got) != 1 || len(got[0]) != 20000 || got[0][19999] != "line 19999" {
		t.Fatalf("got %d connections, first with %d lines; want 1 with 20000 in order", len(got), len(got[0]))
	}
}

func TestSendErrors(t *testing.T) {
	// A port nothing listens on: take one and free it.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	free := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	_ = ln.Close()

	tests := map[string]struct {
		args []string
		want string
	}{
		"no sidecar listening": {[]string{"send", free, "x"}, "is this a member pod of the channel?"},
		"no target":            {[]string{"send"}, "name a channel or a port"},
		"port out of range":    {[]string{"send", "70000", "x"}, "out of range"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			code, _, stderr := run(t.Context(), "", tc.args...)
			if code == 0 || !strings.Contains(stderr, tc.want) {
				t.Fatalf("exit %d, stderr %q; want failure mentioning %q", code, stderr, tc.want)
			}
		})
	}
}

// TestTailReconnects: the "sidecar" sends two lines and closes (a restart), then sends
// one more line on the next connection; tail prints all three in order, says it
// reconnected, and returns cleanly when its context ends.
func TestTailReconnects(t *testing.T) {
	var mu sync.Mutex
	accepted := 0
	third := make(chan struct{})
	srv := startLineServer(t, func(c net.Conn) {
		mu.Lock()
		accepted++
		n := accepted
		mu.Unlock()
		switch n {
		case 1:
			_, _ = c.Write([]byte("first\nsecond\n"))
		case 2:
			_, _ = c.Write([]byte("third\n"))
			close(third)
			// Hold the connection like a live sidecar until the client goes away.
			_, _ = c.Read(make([]byte, 1))
		}
	})

	ctx, cancel := context.WithCancel(t.Context())
	var out, errb syncBuffer
	done := make(chan int)
	go func() {
		done <- Run(ctx, []string{"tail", strconv.Itoa(srv.port())}, Streams{In: strings.NewReader(""), Out: &out, Err: &errb})
	}()
	select {
	case <-third:
	case <-time.After(20 * time.Second):
		t.Fatalf("tail never reconnected; stderr: %s", errb.String())
	}
	waitFor(t, func() bool { return strings.Count(out.String(), "\n") == 3 }, "three lines printed")
	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("tail exit %d after cancel: %s", code, errb.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("tail did not stop when its context ended")
	}
	if got := out.String(); got != "first\nsecond\nthird\n" {
		t.Fatalf("tail printed %q", got)
	}
	if !strings.Contains(errb.String(), "reconnecting in") {
		t.Fatalf("tail did not report the reconnection: %q", errb.String())
	}
}

func TestTailNoReconnect(t *testing.T) {
	srv := startLineServer(t, func(c net.Conn) { _, _ = c.Write([]byte("only\nlast-unterminated")) })
	code, stdout, stderr := run(t.Context(), "", "tail", "--no-reconnect", strconv.Itoa(srv.port()))
	if code != 0 || stdout != "only\nlast-unterminated\n" {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
}

func TestBackoff(t *testing.T) {
	b := backoff{min: 100 * time.Millisecond, max: time.Second}
	var got []time.Duration
	for range 6 {
		got = append(got, b.wait())
	}
	want := []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond, time.Second, time.Second}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("waits %v, want %v", got, want)
		}
	}
	b.reset()
	if d := b.wait(); d != 100*time.Millisecond {
		t.Fatalf("after reset: %v", d)
	}
}

// syncBuffer is a bytes.Buffer safe for one writer and concurrent readers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
