package ipc_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/podipc/podipc/pkg/ipc"
)

// serveEcho answers every line of every accepted socket with "ECHO: " + line until the
// server closes; the returned function waits for all handlers to finish.
func serveEcho(srv *ipc.Server) (wait func()) {
	var wg sync.WaitGroup
	wg.Go(func() {
		for sock := range srv.Connections() {
			wg.Go(func() {
				defer func() { _ = sock.Close() }()
				for line := range sock.In() {
					sock.Out() <- "ECHO: " + line
				}
			})
		}
	})
	return wg.Wait
}

func TestPingPong(t *testing.T) {
	for _, network := range networks {
		t.Run(network, func(t *testing.T) {
			noLeaks(t)
			client, server := pair(t, network)
			send(t, client.Out(), "ping")
			if got := recv(t, server.In()); got != "ping" {
				t.Fatalf("server got %q, want ping", got)
			}
			send(t, server.Out(), "pong")
			if got := recv(t, client.In()); got != "pong" {
				t.Fatalf("client got %q, want pong", got)
			}
		})
	}
}

func TestEcho(t *testing.T) {
	for _, network := range networks {
		t.Run(network, func(t *testing.T) {
			noLeaks(t)
			srv := listen(t, network)
			handlers := serveEcho(srv)
			c := dial(t, srv)
			for _, line := range []string{"hello", "", "with spaces and ünïcödé", "x"} {
				send(t, c.Out(), line)
				if got, want := recv(t, c.In()), "ECHO: "+line; got != want {
					t.Fatalf("got %q, want %q", got, want)
				}
			}
			_ = c.Close()
			_ = srv.Close()
			handlers()
		})
	}
}

func TestManyMessagesArriveInOrder(t *testing.T) {
	const n = 20000
	for _, network := range networks {
		t.Run(network, func(t *testing.T) {
			noLeaks(t)
			client, server := pair(t, network)
			go func() {
				for i := range n {
					client.Out() <- strconv.Itoa(i)
				}
			}()
			for i := range n {
				if got := recv(t, server.In()); got != strconv.Itoa(i) {
					t.Fatalf("message %d is %q", i, got)
				}
			}
		})
	}
}

func TestFiftyConcurrentClients(t *testing.T) {
	const clients, lines = 50, 100
	for _, network := range networks {
		t.Run(network, func(t *testing.T) {
			noLeaks(t)
			srv := listen(t, network)
			handlers := serveEcho(srv)
			errs := make(chan error, clients)
			var wg sync.WaitGroup
			var socks []*ipc.Socket
			for i := range clients {
				c := dial(t, srv)
				socks = append(socks, c)
				wg.Go(func() {
					errs <- echoLines(c, i, lines)
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Error(err)
				}
			}
			for _, c := range socks {
				_ = c.Close()
			}
			_ = srv.Close()
			handlers()
		})
	}
}

// echoLines sends lines and checks each echo, from a goroutine (so no t.Fatal).
func echoLines(c *ipc.Socket, client, lines int) error {
	go func() {
		for j := range lines {
			c.Out() <- fmt.Sprintf("client %d line %d", client, j)
		}
	}()
	for j := range lines {
		want := fmt.Sprintf("ECHO: client %d line %d", client, j)
		select {
		case got, ok := <-c.In():
			if !ok {
				return fmt.Errorf("client %d: In() closed after %d lines: %w", client, j, c.Err())
			}
			if got != want {
				return fmt.Errorf("client %d: got %q, want %q", client, got, want)
			}
		case <-time.After(wait):
			return fmt.Errorf("client %d: no echo for line %d", client, j)
		}
	}
	return nil
}

func TestCloseEndsPeer(t *testing.T) {
	for _, network := range networks {
		for _, closer := range []string{"client", "server"} {
			t.Run(network+"/"+closer+" closes", func(t *testing.T) {
				noLeaks(t)
				client, server := pair(t, network)
				closing, peer := client, server
				if closer == "server" {
					closing, peer = server, client
				}
				// Queued output is flushed by Close, and all of it reaches the peer
				// before its In() closes.
				const queued = 5000
				read := make(chan []string, 1)
				go func() { read <- drainUntilClosed(t, peer.In()) }()
				for i := range queued {
					send(t, closing.Out(), strconv.Itoa(i))
				}
				if err := closing.Close(); err != nil {
					t.Fatalf("Close: %v", err)
				}
				got := <-read
				if len(got) != queued || got[0] != "0" || got[queued-1] != strconv.Itoa(queued-1) {
					t.Fatalf("peer read %d messages before In() closed, want %d", len(got), queued)
				}
				waitDone(t, peer)
				if err := peer.Err(); err != nil {
					t.Errorf("peer Err() = %v, want nil after a clean close", err)
				}
				if err := closing.Err(); err != nil {
					t.Errorf("closer Err() = %v, want nil", err)
				}
				select {
				case <-closing.Done():
				default:
					t.Error("Done() not closed after Close returned")
				}
				if err := closing.Close(); err != nil {
					t.Errorf("second Close: %v", err)
				}
			})
		}
	}
}

func TestServerClose(t *testing.T) {
	for _, network := range networks {
		t.Run(network, func(t *testing.T) {
			noLeaks(t)
			srv := listen(t, network)
			taken := dial(t, srv)
			owned := accept(t, srv)
			// Accepted but never taken from Connections(): the server must close it.
			waiting := dial(t, srv)
			// Give the server time to accept it into Connections(): without a
			// message from it there is no other signal.
			time.Sleep(100 * time.Millisecond)

			if err := srv.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			select {
			case s, ok := <-srv.Connections():
				if ok {
					_ = s.Close()
					t.Fatal("Connections() yielded a socket after Close")
				}
			case <-time.After(wait):
				t.Fatal("Connections() not closed by Close")
			}

			// The socket already taken still works in both directions.
			send(t, taken.Out(), "still here")
			if got := recv(t, owned.In()); got != "still here" {
				t.Fatalf("got %q", got)
			}
			send(t, owned.Out(), "me too")
			if got := recv(t, taken.In()); got != "me too" {
				t.Fatalf("got %q", got)
			}
			// The one nobody took has been closed.
			drainUntilClosed(t, waiting.In())

			// Nothing listens any more.
			var d net.Dialer
			if c, err := d.DialContext(t.Context(), srv.Addr().Network(), srv.Addr().String()); err == nil {
				_ = c.Close()
				t.Error("dial succeeded after Server.Close")
			}
			if err := srv.Close(); err != nil {
				t.Errorf("second Close: %v", err)
			}
		})
	}
}

func TestSendsAfterEndNeitherBlockNorPanic(t *testing.T) {
	for _, network := range networks {
		t.Run(network, func(t *testing.T) {
			noLeaks(t)
			client, server := pair(t, network, ipc.WithOutBuffer(4))
			_ = server.Close()
			drainUntilClosed(t, client.In())
			waitDone(t, client)

			// Far more than Out()'s buffer: each send must be taken and discarded.
			const sends = 1000
			sent := make(chan struct{})
			go func() {
				defer close(sent)
				for i := range sends {
					client.Out() <- strconv.Itoa(i)
				}
			}()
			select {
			case <-sent:
			case <-time.After(wait):
				t.Fatal("sends on Out() after the end blocked")
			}
			if err := client.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
			if got := client.Dropped(); got < sends-4 {
				t.Errorf("Dropped() = %d, want at least %d", got, sends-4)
			}
		})
	}
}

func TestMessagesSplitAcrossWrites(t *testing.T) {
	const stream = "alpha\nbeta\r\n\ngamma\n"
	want := []string{"alpha", "beta", "", "gamma"}
	for _, network := range networks {
		t.Run(network, func(t *testing.T) {
			noLeaks(t)
			srv := listen(t, network)
			for cut := range len(stream) + 1 {
				conn := dialRaw(t, srv)
				sock := accept(t, srv)
				// Two writes with a pause between: the socket reads the first part
				// alone (the pause only makes that likely; the test is correct
				// either way).
				if _, err := io.WriteString(conn, stream[:cut]); err != nil {
					t.Fatal(err)
				}
				time.Sleep(time.Millisecond)
				if _, err := io.WriteString(conn, stream[cut:]); err != nil {
					t.Fatal(err)
				}
				for i, w := range want {
					if got := recv(t, sock.In()); got != w {
						t.Fatalf("cut %d: message %d is %q, want %q", cut, i, got, w)
					}
				}
				_ = conn.Close()
				_ = sock.Close()
			}
		})
	}
}

// TestCompleteMessagesAreNotHeldForMore checks that the reader hands over every complete
// message at once, even when the bytes that follow it are the start of a message that
// never completes: batching must never wait for more input.
func TestCompleteMessagesAreNotHeldForMore(t *testing.T) {
	for _, network := range networks {
		t.Run(network, func(t *testing.T) {
			noLeaks(t)
			srv := listen(t, network)
			conn := dialRaw(t, srv)
			sock := accept(t, srv)
			// Three complete lines and a partial one in a single write: the socket
			// reads them together, and the partial line stays incomplete.
			if _, err := io.WriteString(conn, "one\ntwo\nthree\npart"); err != nil {
				t.Fatal(err)
			}
			for _, want := range []string{"one", "two", "three"} {
				if got := recv(t, sock.In()); got != want {
					t.Fatalf("got %q, want %q", got, want)
				}
			}
			if _, err := io.WriteString(conn, "ial\n"); err != nil {
				t.Fatal(err)
			}
			if got := recv(t, sock.In()); got != "partial" {
				t.Fatalf("got %q, want %q", got, "partial")
			}
			_ = conn.Close()
			_ = sock.Close()
		})
	}
}

func TestLinesAreWrittenWithNewline(t *testing.T) {
	for _, network := range networks {
		t.Run(network, func(t *testing.T) {
			noLeaks(t)
			srv := listen(t, network)
			conn := dialRaw(t, srv)
			sock := accept(t, srv)
			for _, m := range []string{"one", "two\r", ""} {
				send(t, sock.Out(), m)
			}
			// "two\r" is sent as is; a Lines reader would take its \r\n as the
			// terminator, which is the price of accepting \r\n.
			want := "one\ntwo\r\n\n"
			got := make([]byte, len(want))
			_ = conn.SetReadDeadline(time.Now().Add(wait))
			if _, err := io.ReadFull(conn, got); err != nil {
				t.Fatal(err)
			}
			if string(got) != want {
				t.Fatalf("wire bytes %q, want %q", got, want)
			}
		})
	}
}

func TestUnframeableMessageIsDroppedAndReported(t *testing.T) {
	for _, network := range networks {
		t.Run(network, func(t *testing.T) {
			noLeaks(t)
			reported := make(chan error, 10)
			client, server := pair(t, network, ipc.WithMaxMessageBytes(16),
				ipc.WithErrorHandler(func(_ *ipc.Socket, err error) { reported <- err }))
			send(t, client.Out(), "two\nlines")
			send(t, client.Out(), strings.Repeat("x", 17))
			send(t, client.Out(), "fine")
			if got := recv(t, server.In()); got != "fine" {
				t.Fatalf("got %q, want only the frameable message", got)
			}
			for _, want := range []error{ipc.ErrUnframeable, ipc.ErrMessageTooLarge} {
				select {
				case err := <-reported:
					if !errors.Is(err, want) {
						t.Errorf("reported %v, want %v", err, want)
					}
				case <-time.After(wait):
					t.Fatalf("%v not reported", want)
				}
			}
			if got := client.Dropped(); got != 2 {
				t.Errorf("Dropped() = %d, want 2", got)
			}
			select {
			case <-client.Done():
				t.Fatalf("the sender ended: %v", client.Err())
			default:
			}
		})
	}
}

func TestOversizedMessageEndsOnlyThatSocket(t *testing.T) {
	const limit = 1024
	for _, network := range networks {
		t.Run(network, func(t *testing.T) {
			noLeaks(t)
			srv := listen(t, network, ipc.WithMaxMessageBytes(limit))
			bystander := dial(t, srv)
			bystanderPeer := accept(t, srv)
			conn := dialRaw(t, srv)
			victim := accept(t, srv)

			// A line as long as the limit is fine, even with \r\n.
			if _, err := io.WriteString(conn, strings.Repeat("a", limit)+"\r\n"); err != nil {
				t.Fatal(err)
			}
			if got := recv(t, victim.In()); len(got) != limit {
				t.Fatalf("message at the limit arrived as %d bytes", len(got))
			}
			// An endless line: the socket must give up without reading all of it.
			written := make(chan int64, 1)
			go func() {
				n, _ := io.Copy(conn, io.LimitReader(endless{}, 1<<30))
				written <- n
			}()
			drainUntilClosed(t, victim.In())
			err := victim.Err()
			if !errors.Is(err, ipc.ErrMessageTooLarge) || !strings.Contains(err.Error(), strconv.Itoa(limit)) {
				t.Fatalf("Err() = %v, want ErrMessageTooLarge naming the limit %d", err, limit)
			}
			select {
			case n := <-written:
				if n == 1<<30 {
					t.Fatal("the whole endless line was accepted")
				}
			case <-time.After(wait):
				t.Fatal("the writer of the endless line was never cut off")
			}

			// The other connection is unaffected.
			send(t, bystander.Out(), "still fine")
			if got := recv(t, bystanderPeer.In()); got != "still fine" {
				t.Fatalf("bystander got %q", got)
			}
		})
	}
}

// endless is an io.Reader of 'x' without a line break, ever.
type endless struct{}

func (endless) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = 'x'
	}
	return len(p), nil
}

func TestPeerVanishesMidMessage(t *testing.T) {
	for _, network := range networks {
		t.Run(network+"/clean close", func(t *testing.T) {
			noLeaks(t)
			srv := listen(t, network)
			conn := dialRaw(t, srv)
			sock := accept(t, srv)
			if _, err := io.WriteString(conn, "complete\npartial"); err != nil {
				t.Fatal(err)
			}
			_ = conn.Close()
			// A clean end delivers the unterminated last line, as async-sockets did.
			got := drainUntilClosed(t, sock.In())
			if strings.Join(got, "|") != "complete|partial" {
				t.Fatalf("read %q", got)
			}
			waitDone(t, sock)
			if err := sock.Err(); err != nil {
				t.Fatalf("Err() = %v, want nil", err)
			}
		})
		t.Run(network+"/reset", func(t *testing.T) {
			noLeaks(t)
			srv := listen(t, network)
			conn := dialRaw(t, srv)
			sock := accept(t, srv)
			// Closing a connection with unread input resets it (TCP sends RST; a Unix
			// peer reads ECONNRESET): leave some of "unread" unread.
			send(t, sock.Out(), "unread")
			if _, err := io.ReadFull(conn, make([]byte, 1)); err != nil {
				t.Fatal(err)
			}
			if _, err := io.WriteString(conn, "complete\n"); err != nil {
				t.Fatal(err)
			}
			if got := recv(t, sock.In()); got != "complete" {
				t.Fatalf("got %q", got)
			}
			if _, err := io.WriteString(conn, "partial"); err != nil {
				t.Fatal(err)
			}
			_ = conn.Close()
			// A partial message before a failure is not delivered.
			if got := drainUntilClosed(t, sock.In()); len(got) != 0 {
				t.Fatalf("read %q after the reset", got)
			}
			waitDone(t, sock)
			if err := sock.Err(); !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("Err() = %v, want a connection reset", err)
			}
		})
	}
}

func TestFullInPausesReading(t *testing.T) {
	for _, network := range networks {
		t.Run(network, func(t *testing.T) {
			noLeaks(t)
			srv := listen(t, network, ipc.WithInBuffer(1))
			conn := dialRaw(t, srv)
			sock := accept(t, srv)
			// Nobody reads In(): the writer must eventually be held back by the
			// transport instead of the socket buffering without bound.
			_ = conn.SetWriteDeadline(time.Now().Add(2 * time.Second))
			line := []byte(strings.Repeat("y", 1000) + "\n")
			var total int
			for total < 1<<30 {
				n, err := conn.Write(line)
				total += n
				if err != nil {
					break
				}
			}
			if total >= 1<<30 {
				t.Fatalf("wrote %d bytes to a socket nobody reads", total)
			}
			// Everything accepted is delivered once the owner reads again.
			_ = conn.SetWriteDeadline(time.Time{})
			go func() { _ = conn.Close() }()
			var got int
			for m := range sock.In() {
				got += len(m) + 1
			}
			// The last line may be partial: it arrives without its '\n'.
			if got > total+1 || got < total-len(line) {
				t.Fatalf("read %d bytes, wrote %d", got, total)
			}
		})
	}
}

func TestInvalidOptions(t *testing.T) {
	tests := map[string][]ipc.Option{
		"message limit above 16 MiB": {ipc.WithMaxMessageBytes(ipc.MaxMessageBytesLimit + 1)},
		"zero message limit":         {ipc.WithMaxMessageBytes(0)},
		"negative buffer":            {ipc.WithInBuffer(-1)},
		"unknown framing":            {ipc.WithFraming(ipc.Framing(42))},
		"negative write timeout":     {ipc.WithWriteTimeout(-time.Second)},
	}
	for name, opts := range tests {
		t.Run(name, func(t *testing.T) {
			noLeaks(t)
			if srv, err := ipc.Listen("tcp", "127.0.0.1:0", opts...); err == nil {
				_ = srv.Close()
				t.Fatal("Listen accepted the options")
			}
			srv := listen(t, "tcp")
			if c, err := ipc.Dial(t.Context(), "tcp", srv.Addr().String(), opts...); err == nil {
				_ = c.Close()
				t.Fatal("Dial accepted the options")
			}
			// NewSocket has no error result: the socket has ended, saying why, and
			// still discards sends.
			conn := dialRaw(t, srv)
			s := ipc.NewSocket(conn, opts...)
			waitDone(t, s)
			if s.Err() == nil || !strings.Contains(s.Err().Error(), "invalid options") {
				t.Errorf("Err() = %v, want the option error", s.Err())
			}
			send(t, s.Out(), "discarded")
			drainUntilClosed(t, s.In())
			_ = s.Close()
		})
	}
	if _, err := ipc.Listen("udp", "127.0.0.1:0"); err == nil {
		t.Error("Listen accepted udp")
	}
}

func TestMaxMessageLimitIsAccepted(t *testing.T) {
	noLeaks(t)
	client, server := pair(t, "unix", ipc.WithMaxMessageBytes(ipc.MaxMessageBytesLimit))
	big := strings.Repeat("z", ipc.MaxMessageBytesLimit)
	send(t, client.Out(), big)
	if got := recv(t, server.In()); got != big {
		t.Fatalf("got %d bytes, want %d", len(got), len(big))
	}
}

func TestRawFraming(t *testing.T) {
	for _, network := range networks {
		t.Run(network, func(t *testing.T) {
			noLeaks(t)
			client, server := pair(t, network, ipc.WithFraming(ipc.Raw), ipc.WithMaxMessageBytes(8))
			const want = "no\nframing\fat all, longer than eight"
			send(t, client.Out(), want[:10])
			send(t, client.Out(), want[10:])
			var got strings.Builder
			for got.Len() < len(want) {
				chunk := recv(t, server.In())
				if len(chunk) > 8 {
					t.Fatalf("chunk of %d bytes, limit 8", len(chunk))
				}
				got.WriteString(chunk)
			}
			if got.String() != want {
				t.Fatalf("got %q", got.String())
			}
		})
	}
}

func TestNodeIPCMalformedFramesAreSkipped(t *testing.T) {
	for _, network := range networks {
		t.Run(network, func(t *testing.T) {
			noLeaks(t)
			reported := make(chan error, 10)
			srv := listen(t, network, ipc.WithFraming(ipc.NodeIPC),
				ipc.WithErrorHandler(func(_ *ipc.Socket, err error) { reported <- err }))
			conn := dialRaw(t, srv)
			sock := accept(t, srv)
			valid := []string{
				`{"type":"message","data":"hello"}`,
				`{"type":"no-data"}`,
				` { "data" : [1,{"type":2}], "type" : "spaced" } `,
			}
			bad := []string{
				`not json`,
				`{"data":"no type"}`,
				`{"type":5,"data":1}`,
				`["type","message"]`,
				`{"type":"truncated","data":`,
				``,
			}
			stream := valid[0] + "\f" + strings.Join(bad, "\f") + "\f" + valid[1] + "\f" + valid[2] + "\f"
			if _, err := io.WriteString(conn, stream); err != nil {
				t.Fatal(err)
			}
			for _, want := range valid {
				if got := recv(t, sock.In()); got != want {
					t.Fatalf("got %q, want %q verbatim", got, want)
				}
			}
			for range bad {
				select {
				case err := <-reported:
					if !errors.Is(err, ipc.ErrMalformed) {
						t.Errorf("reported %v, want ErrMalformed", err)
					}
				case <-time.After(wait):
					t.Fatal("malformed frame not reported")
				}
			}
			if got := sock.Malformed(); got != uint64(len(bad)) {
				t.Errorf("Malformed() = %d, want %d", got, len(bad))
			}
			// The connection is still up, both ways.
			ev, _ := ipc.EncodeEvent("reply", 1)
			send(t, sock.Out(), string(ev))
			_ = conn.SetReadDeadline(time.Now().Add(wait))
			got, err := bufio.NewReader(conn).ReadString('\f')
			if err != nil || got != `{"type":"reply","data":1}`+"\f" {
				t.Fatalf("peer read %q, %v", got, err)
			}
			if _, err := io.WriteString(conn, valid[0]+"\f"); err != nil {
				t.Fatal(err)
			}
			if got := recv(t, sock.In()); got != valid[0] {
				t.Fatalf("got %q after the malformed frames", got)
			}
		})
	}
}

func TestStaleUnixSocketIsReplaced(t *testing.T) {
	noLeaks(t)
	path := address(t, "unix")
	// A server that died without removing its socket file.
	var lc net.ListenConfig
	ln, err := lc.Listen(t.Context(), "unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	_ = ln.Close()

	srv, err := ipc.Listen("unix", path)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	defer func() { _ = srv.Close() }()

	// A live one is not taken over.
	if other, err := ipc.Listen("unix", path); err == nil {
		_ = other.Close()
		t.Fatal("Listen took over a socket that is being served")
	}
	// The probe that found it live shows up as a connection that ends at once.
	probe := accept(t, srv)
	drainUntilClosed(t, probe.In())
	c := dial(t, srv)
	s := accept(t, srv)
	send(t, c.Out(), "the first server still works")
	recv(t, s.In())
}

func TestUnixListenNeverRemovesOtherFiles(t *testing.T) {
	noLeaks(t)
	path := address(t, "unix")
	if err := os.WriteFile(path, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	if srv, err := ipc.Listen("unix", path); err == nil {
		_ = srv.Close()
		t.Fatal("Listen replaced a regular file")
	}
	if got, err := os.ReadFile(path); err != nil || string(got) != "precious" {
		t.Fatalf("file now %q, %v", got, err)
	}
}
