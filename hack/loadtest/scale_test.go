package main

import (
	"bufio"
	"context"
	"encoding/xml"
	"errors"
	"io"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// hub is an in-process Broadcast channel: every line read from one connection is written
// to every other connection. dropEvery, if not 0, makes it skip every dropEvery-th line
// to the first connection, as a lossy forwarder would.
type hub struct {
	ln        net.Listener
	dropEvery int

	mu    sync.Mutex
	conns []*hubConn
	wg    sync.WaitGroup
}

type hubConn struct {
	mu sync.Mutex
	c  net.Conn
	w  *bufio.Writer
	n  int
}

func startHub(t *testing.T, dropEvery int) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := &hub{ln: ln, dropEvery: dropEvery}
	t.Cleanup(func() {
		_ = ln.Close()
		h.mu.Lock()
		for _, c := range h.conns {
			_ = c.c.Close()
		}
		h.mu.Unlock()
		h.wg.Wait()
	})
	h.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			hc := &hubConn{c: c, w: bufio.NewWriter(c)}
			h.mu.Lock()
			h.conns = append(h.conns, hc)
			h.mu.Unlock()
			h.wg.Go(func() { h.serve(hc) })
		}
	})
	return ln.Addr().String()
}

func (h *hub) serve(from *hubConn) {
	r := newLineReader(from.c, ioBufSize)
	for {
		line, err := r.readLine()
		if err != nil {
			return
		}
		h.mu.Lock()
		conns := h.conns
		h.mu.Unlock()
		for i, c := range conns {
			if c == from {
				continue
			}
			c.mu.Lock()
			c.n++
			skip := h.dropEvery > 0 && i == 0 && line[0] != syncByte && c.n%h.dropEvery == 0
			if !skip {
				_, _ = c.w.Write(line)
			}
			if r.buffered() == 0 {
				_ = c.w.Flush()
			}
			c.mu.Unlock()
		}
	}
}

// A fan-out run checks every line at every receiver and reports the slowest one; a
// forwarder that loses lines for one receiver fails it.
func TestMeasureFanOut(t *testing.T) {
	addr := startHub(t, 0)
	open := func(ctx context.Context) (path, error) { return dialBoth(ctx, addr, addr, addr, addr) }
	res, err := measureThroughput(t.Context(), open, func() usage { return usage{} }, nil, 64, 50*time.Millisecond, 200*time.Millisecond, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if res.slowest <= 0 || res.rate < 3*res.slowest*0.99 || res.received%3 != 0 {
		t.Fatalf("3 receivers: aggregate %.0f, slowest %.0f, received %d", res.rate, res.slowest, res.received)
	}

	lossy := startHub(t, 1000)
	open = func(ctx context.Context) (path, error) { return dialBoth(ctx, lossy, lossy, lossy, lossy) }
	if _, err := measureThroughput(t.Context(), open, func() usage { return usage{} }, nil, 64, 50*time.Millisecond, 200*time.Millisecond, 1<<20); err == nil || !strings.Contains(err.Error(), "loss") {
		t.Fatalf("a lost line to one receiver: err %v, want a loss", err)
	}
}

// All to all: every app hears every other app's lines, checked per sender, and a
// forwarder losing lines is caught.
func TestMeasureAllToAll(t *testing.T) {
	addr := startHub(t, 0)
	open := func(ctx context.Context, _ int) (path, error) { return dialApp(ctx, addr) }
	res, err := measureAllToAll(t.Context(), open, nil, 4, 64, 500, 300*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if res.missing != 0 || res.sent < 4*100 || res.expected != 4*3*500 {
		t.Fatalf("all to all: %+v", res)
	}

	lossy := startHub(t, 50)
	open = func(ctx context.Context, _ int) (path, error) { return dialApp(ctx, lossy) }
	if _, err := measureAllToAll(t.Context(), open, nil, 4, 64, 500, 300*time.Millisecond); err == nil || !strings.Contains(err.Error(), "loss") {
		t.Fatalf("a lossy forwarder: err %v, want a loss", err)
	}
}

// The plots are well-formed SVG with one polyline per series.
func TestScalePlotsAreSVG(t *testing.T) {
	c := chart{title: "t <&>", xlabel: "N", ylabel: "lines/s", xs: []string{"2", "4", "8"}, series: []series{
		{name: "podipc", color: "#000", ys: []float64{1e6, 2e6, 3e6}},
		{name: "NATS", color: "#888", dashed: true, ys: []float64{5e5, 4e5, 0}},
	}}
	doc := stack(c.svg(), c.svg())
	d := xml.NewDecoder(strings.NewReader(doc))
	lines := 0
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("not XML: %v\n%s", err, doc)
		}
		if se, ok := tok.(xml.StartElement); ok && se.Name.Local == "polyline" {
			lines++
		}
	}
	if lines != 4 {
		t.Fatalf("%d polylines, want 4", lines)
	}
	for x, want := range map[float64]float64{0.3: 0.5, 1.2e6: 2e6, 7: 10, 450: 500} {
		if got := niceStep(x); got != want {
			t.Errorf("niceStep(%g) = %g, want %g", x, got, want)
		}
	}
}

func TestDisplayArgsNamesNoMachinePaths(t *testing.T) {
	got := strings.Join(displayArgs([]string{"scale", "-sidecar=/opt/checkout/bin/podipc-sidecar", "-members=2,4", "-svg-dir=/opt/checkout/docs/scale"}), " ")
	if want := "scale -sidecar=bin/podipc-sidecar -members=2,4 -svg-dir=docs/scale"; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

// buildSidecar builds the sidecar of this repository into a temporary directory.
func buildSidecar(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "podipc-sidecar")
	build := exec.Command("go", "build", "-o", bin, "./cmd/podipc-sidecar")
	build.Dir = filepath.Join("..", "..")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the sidecar: %v\n%s", err, out)
	}
	return bin
}

// lateConn is a receiving app's connection that dials only when it is first read, after
// a delay: the sync lines sent before it connects reach its sidecar with no connection.
type lateConn struct {
	net.Conn // nil until the first Read
	addr     string
	delay    time.Duration
	once     sync.Once
	err      error
}

func (c *lateConn) Read(b []byte) (int, error) {
	c.once.Do(func() {
		time.Sleep(c.delay)
		c.Conn, c.err = net.Dial("tcp", c.addr)
	})
	if c.err != nil {
		return 0, c.err
	}
	return c.Conn.Read(b)
}

func (c *lateConn) SetWriteDeadline(time.Time) error { return nil } // a receiver writes nothing

func (c *lateConn) Close() error {
	c.once.Do(func() { c.err = net.ErrClosed })
	if c.Conn == nil {
		return nil
	}
	return c.Conn.Close()
}

// A receiver that connects after the sync has begun makes its sidecar count the sync
// lines it missed (no_connection). Those are not lines of the measurement: the phase
// must count drops from the sync on, and with fast readers report nothing lost.
func TestScaleOverloadIgnoresSyncLineDrops(t *testing.T) {
	cfg, err := parseScaleFlags([]string{"-sidecar=" + buildSidecar(t), "-overload-duration=1s", "-settle=500ms"})
	if err != nil {
		t.Fatal(err)
	}
	ms := []member{{"pod-00", "uid-00", "127.78.1.1"}, {"pod-01", "uid-01", "127.78.1.2"}, {"pod-02", "uid-02", "127.78.1.3"}}
	late := func(ctx context.Context, tx string, rx ...string) (path, error) {
		var d net.Dialer
		first, err := d.DialContext(ctx, "tcp", rx[0])
		if err != nil {
			return nil, err
		}
		sender, err := d.DialContext(ctx, "tcp", tx)
		if err != nil {
			return nil, errors.Join(err, first.Close())
		}
		return newTCPPath(sender, first, &lateConn{addr: rx[1], delay: time.Second}), nil
	}
	o, err := measureScaleOverload(t.Context(), cfg, t.TempDir(), ms, 1024, 2000, 0, late)
	if err != nil {
		t.Fatal(err)
	}
	if o.res.missing() != 0 || o.counted != 0 {
		t.Fatalf("fast receivers of 2,000 lines/s: missed %d lines, %v counted after the sync", o.res.missing(), o.dropped)
	}
}

// The overload phase against real sidecars (built from this repository): three members
// under a 64 Mi limit, the sender flooding receivers that read slowly, so that lines are
// dropped; every line a receiver missed must be counted by some sidecar, or the run fails.
func TestScaleOverloadCountsEveryMissingLine(t *testing.T) {
	cfg, err := parseScaleFlags([]string{"-sidecar=" + buildSidecar(t), "-memory-limit=64Mi", "-overload-duration=1s", "-settle=500ms"})
	if err != nil {
		t.Fatal(err)
	}
	ms := []member{{"pod-00", "uid-00", "127.78.0.1"}, {"pod-01", "uid-01", "127.78.0.2"}, {"pod-02", "uid-02", "127.78.0.3"}}
	o, err := measureScaleOverload(t.Context(), cfg, t.TempDir(), ms, 1024, 20000, 1000, dialApps)
	if err != nil {
		t.Fatal(err)
	}
	if o.res.missing() == 0 || o.counted == 0 {
		t.Fatalf("receivers reading 1,000 of 20,000 lines/s missed %d lines, %v counted: the run did not overload", o.res.missing(), o.dropped)
	}
	if o.budget != 32<<20 || o.peak == 0 || o.usedPeak == 0 {
		t.Fatalf("budget %.0f bytes (want half of 64 Mi), peak RSS %d, memory used peak %.0f", o.budget, o.peak, o.usedPeak)
	}
	t.Logf("missed %d, counted %v; sending sidecar RSS %s → %s, memory used peak %s", o.res.missing(), o.dropped, mb(o.idle), mb(o.peak), mb(int64(o.usedPeak)))
}
