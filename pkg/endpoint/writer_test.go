package endpoint

import (
	"bufio"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/ipc"
	"github.com/podipc/podipc/pkg/router"
)

// TestWriterAfterAnIdleMinute: the writer's deadline runs from the batch it writes, not
// from the one before: a batch larger than the write buffer, written after the
// connection was idle for longer than writeTimeout, reaches the app whole. (The deadline
// was once set only before the final flush, so such a batch's first bytes, written while
// it was encoded, met the previous batch's deadline and the app lost its connection.)
func TestWriterAfterAnIdleMinute(t *testing.T) {
	defer func(d time.Duration) { writeTimeout = d }(writeTimeout)
	writeTimeout = 100 * time.Millisecond

	r := router.New(logr.Discard(), nil)
	t.Cleanup(r.Close)
	ch := r.Ensure("orders", discovery.Spec{Overflow: discovery.Overflow{Policy: discovery.Block, QueueBytes: 64 << 20}})
	server, app := tcpPair(t)
	e := &Endpoint{ch: ch, kind: router.Line, framing: ipc.Lines, log: logr.Discard()}
	c := ch.Attach(router.Line, "app", func() { _ = server.Close() })
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { defer close(done); e.writeLoop(server, c, stop) }()
	t.Cleanup(func() { close(stop); <-done })
	in := bufio.NewReader(app)

	deliver := func(first, n int) {
		lines := make([]buffer.Payload, n)
		for i := range lines {
			s := fmt.Sprintf("%08d ", first+i)
			lines[i] = buffer.Payload{Data: []byte(s + strings.Repeat("x", 1023-len(s)))}
		}
		done := router.NewCompletion(make(chan struct{}, 1))
		r.DeliverBatch(t.Context(), "orders", router.Line, lines, done)
		done.Done()
	}
	read := func(first, n int) {
		_ = app.SetReadDeadline(time.Now().Add(10 * time.Second))
		for i := range n {
			line, err := in.ReadString('\n')
			if err != nil {
				t.Fatalf("line %d of %d: %v (the writer closed the app's connection)", i, n, err)
			}
			if want := fmt.Sprintf("%08d ", first+i); !strings.HasPrefix(line, want) {
				t.Fatalf("line %d of %d: got %.20q, want it to start %q", i, n, line, want)
			}
		}
	}
	deliver(1, 1)
	read(1, 1)
	time.Sleep(3 * writeTimeout)
	deliver(2, 256) // 256 KiB: four times the ipc.Writer's buffer, written as one batch
	read(2, 256)
}

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (server, client net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = server.Close(); _ = client.Close() })
	return server, client
}
