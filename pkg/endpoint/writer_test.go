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

// lines returns n numbered lines of about size bytes, from first on, without their '\n'.
func lines(first, n, size int) []buffer.Payload {
	out := make([]buffer.Payload, n)
	for i := range out {
		s := fmt.Sprintf("%08d ", first+i)
		out[i] = buffer.Payload{Data: []byte(s + strings.Repeat("x", max(size-len(s)-1, 0)))}
	}
	return out
}

// readLines reads n lines from r and fails the test unless they are numbered first,
// first+1, … in order.
func readLines(t *testing.T, r *bufio.Reader, first, n int) {
	t.Helper()
	for i := range n {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("line %d of %d: %v", i, n, err)
		}
		if want := fmt.Sprintf("%08d ", first+i); !strings.HasPrefix(line, want) {
			t.Fatalf("line %d of %d: got %.20q, want it to start %q (lost or reordered)", i, n, line, want)
		}
	}
}

// stalledApp serves channel "orders" on a line port with one app connected that reads
// nothing until the test says so. (Its receive buffer is left as it is: shrunk after the
// connection is up, it makes the kernel drop segments already in flight, and TCP's
// retransmission backoff then stalls the stream for minutes.)
func stalledApp(t testing.TB) (*router.Router, net.Conn, *bufio.Reader) {
	t.Helper()
	r := router.New(logr.Discard(), nil)
	t.Cleanup(r.Close)
	r.UseBudget(buffer.NewBudget(1 << 40)) // to see what is charged, not to limit it
	// Queues large enough that the pushes below never wait: what holds the lines back
	// is the app's socket alone.
	ch := r.Ensure("orders", discovery.Spec{Overflow: discovery.Overflow{Policy: discovery.Block, QueueBytes: 64 << 20}})
	ep, err := ListenLines(ch, "127.0.0.1:0", Options{}, logr.Discard())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ep.Close() })
	go func() { _ = ep.Start(t.Context()) }()
	app, err := net.Dial("tcp", ep.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = app.Close() })
	in := bufio.NewReader(app)
	// A first line read back says the connection is attached to the channel.
	for attached := false; !attached; {
		c := router.NewCompletion(make(chan struct{}, 1))
		r.DeliverBatch(t.Context(), "orders", router.Line, lines(0, 1, 16), c)
		c.Done()
		_ = app.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if _, err := in.ReadString('\n'); err == nil {
			attached = true
		}
	}
	_ = app.SetReadDeadline(time.Time{})
	return r, app, in
}

// TestOfferedLinesToAStalledApp: lines from a peer are written from the goroutine that
// delivers them while the app reads; once its socket is full that goroutine neither
// blocks nor reports the lines written. When the app reads again, every line arrives, in
// order, and only then are the peer's lines complete (acknowledgeable).
func TestOfferedLinesToAStalledApp(t *testing.T) {
	r, app, in := stalledApp(t)
	budget := r.Budget()
	idle := budget.Used()
	// First one batch of 16 MiB, more than loopback sockets buffer, then small batches
	// that find it still being written.
	const big, batches, per, size = 16 << 10, 64, 16, 1024
	var done []*router.Completion
	deliver := func(first, n int) {
		c := router.NewCompletion(make(chan struct{}, 1))
		r.DeliverBatch(t.Context(), "orders", router.Line, lines(first, n, size), c)
		c.Done() // the deliverer's own reference
		done = append(done, c)
	}
	delivered := make(chan struct{})
	go func() {
		defer close(delivered)
		deliver(1, big)
		for b := range batches {
			deliver(1+big+b*per, per)
		}
	}()
	select {
	case <-delivered:
	case <-time.After(30 * time.Second):
		t.Fatal("delivering to a stalled app blocked the delivering goroutine (a peer link's read loop)")
	}
	for i, c := range []*router.Completion{done[0], done[len(done)-1]} {
		if c.Complete() {
			t.Fatalf("batch %d counts as written while the app has read none of its 16 MiB: a peer would have it acknowledged", i)
		}
	}
	readLines(t, in, 1, big+batches*per)
	deadline := time.Now().Add(10 * time.Second)
	for i, c := range done {
		for !c.Complete() {
			if time.Now().After(deadline) {
				t.Fatalf("batch %d of %d was read by the app but never completed", i, len(done))
			}
			time.Sleep(time.Millisecond)
		}
	}
	_ = app.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if extra, err := in.ReadString('\n'); err == nil {
		t.Fatalf("a line arrived twice or from nowhere: %.20q", extra)
	}
	// Everything written: the memory budget holds what it held before, no more (the
	// bytes the full socket refused were charged while the writer kept them).
	if used := budget.Used(); used != idle {
		t.Fatalf("memory budget charged %d bytes once every line was written, %d before the lines came", used, idle)
	}
}

// TestWriterAfterAnIdleMinute: the writer goroutine's write deadline runs from the batch
// it writes, not from the one before: a batch larger than the write buffer, written
// after the connection was idle for longer than writeTimeout, reaches the app whole.
// (The deadline was once set only before the final flush, so such a batch's first
// bytes, written while it was encoded, met the stale deadline and the app lost its
// connection.)
func TestWriterAfterAnIdleMinute(t *testing.T) {
	defer func(d time.Duration) { writeTimeout = d }(writeTimeout)
	writeTimeout = 100 * time.Millisecond

	r := router.New(logr.Discard(), nil)
	t.Cleanup(r.Close)
	ch := r.Ensure("orders", discovery.Spec{Overflow: discovery.Overflow{Policy: discovery.Block, QueueBytes: 64 << 20}})
	server, app := tcpPair(t)
	e := &Endpoint{ch: ch, kind: router.Line, framing: ipc.Lines, log: logr.Discard()}
	w := newWriter(e, server)
	w.out.raw = nil // the writer goroutine's path only: no offer writes
	w.c = ch.Attach(router.Line, "app", func() { _ = server.Close() }, nil)
	in := bufio.NewReader(app)

	deliver := func(first, n int) error {
		c := router.NewCompletion(make(chan struct{}, 1))
		r.DeliverBatch(t.Context(), "orders", router.Line, lines(first, n, 1024), c)
		c.Done()
		w.mu.Lock()
		ok := w.drain()
		w.mu.Unlock()
		if !ok {
			return fmt.Errorf("the writer failed writing lines %d to %d", first, first+n-1)
		}
		return nil
	}
	if err := deliver(1, 1); err != nil {
		t.Fatal(err)
	}
	readLines(t, in, 1, 1)
	time.Sleep(3 * writeTimeout)
	errc := make(chan error, 1)
	go func() { errc <- deliver(2, 256) }() // 256 KiB: four times the ipc.Writer's buffer
	readLines(t, in, 2, 256)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
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

// BenchmarkOffer: a line delivered to an app connection that keeps up, written by the
// delivering goroutine itself (the receiving sidecar's path for every line from a peer).
// The app's side is drained by a goroutine of its own. 0 allocations per line.
func BenchmarkOffer(b *testing.B) {
	for _, size := range []int{64, 1024} {
		b.Run(fmt.Sprintf("%dB", size), func(b *testing.B) {
			r, _, in := stalledApp(b)
			go func() {
				buf := make([]byte, 64<<10)
				for {
					if _, err := in.Read(buf); err != nil {
						return
					}
				}
			}()
			line := lines(0, 1, size)
			c := router.NewCompletion(make(chan struct{}, 1))
			c.Add(1 << 30) // one completion for every line: its references never run out
			b.SetBytes(int64(size))
			b.ReportAllocs()
			for b.Loop() {
				r.DeliverBatch(b.Context(), "orders", router.Line, line, c)
			}
		})
	}
}

// TestOfferAfterTheWritersDeadline: once the writer goroutine has written a batch with
// its deadline, lines offered after that deadline has passed still reach the app: the
// deadline bounds the goroutine's blocking writes, not the offers that follow. (Left set,
// it made Go refuse every later offer with a timeout, and the sidecar closed the app's
// connection, counting its lines receiver_closed: what the fault suite's long streams
// met a minute into a run.)
func TestOfferAfterTheWritersDeadline(t *testing.T) {
	defer func(d time.Duration) { writeTimeout = d }(writeTimeout)
	writeTimeout = 100 * time.Millisecond
	r, app, in := stalledApp(t)
	deliver := func(first, n int) {
		c := router.NewCompletion(make(chan struct{}, 1))
		r.DeliverBatch(t.Context(), "orders", router.Line, lines(first, n, 1024), c)
		c.Done()
	}
	// 16 MiB to an app that reads nothing for a while: the offer carries what the socket
	// refuses, and the writer goroutine writes it with its deadline.
	deliver(1, 16<<10)
	time.Sleep(writeTimeout / 4)
	readLines(t, in, 1, 16<<10)
	time.Sleep(3 * writeTimeout)
	for i := range 3 {
		deliver(1+16<<10+i, 1)
	}
	_ = app.SetReadDeadline(time.Now().Add(10 * time.Second))
	readLines(t, in, 1+16<<10, 3)
}
