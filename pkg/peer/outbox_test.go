package peer

import (
	"bytes"
	"fmt"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/router"
)

// frames decodes the DATA frames of buf as "seq channel payload".
func frames(t *testing.T, buf []byte) []string {
	t.Helper()
	r := NewReader(bytes.NewReader(buf), MaxFrameBytes)
	defer r.Close()
	var got []string
	for {
		typ, body, err := r.Next()
		if err != nil {
			return got
		}
		if typ != FrameData {
			t.Fatalf("frame type %d, want DATA", typ)
		}
		d, err := ParseData(body)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, fmt.Sprintf("%d %s %s", d.Seq, d.Channel, d.Payload))
	}
}

// TestOutbox follows lines through a link's outbox without a connection: queued
// between sessions, encoded in sequence for the next session's writer, acknowledged
// from the front, settled when the receiver restarted (AnyOne lines back for
// rerouting, Broadcast ones counted as drops per channel), the rest resent from the
// oldest; the bytes per channel and the unacknowledged-bytes gauge follow, and every
// chunk reference taken is released exactly once (a release too many panics).
func TestOutbox(t *testing.T) {
	gauge := prometheus.NewGauge(prometheus.GaugeOpts{Name: "unacked"})
	var mu sync.Mutex
	closed := false
	var o outbox
	o.init(gauge, nil, &mu, &closed)
	chunk := buffer.NewChunk() // the test's own reference
	push := func(channel, line string, anyOne bool) {
		chunk.Retain(1)
		o.push(o.channel(channel), chunk, []byte(line), router.Line, anyOne)
	}

	// Between sessions nothing is encoded.
	push("orders", "o1", false)
	push("events", "e2", true)
	push("orders", "o3", false)
	if buf, n := o.take(nil); n != 0 || len(buf) != 0 {
		t.Fatalf("took %d frames before a session started", n)
	}
	if got := testutil.ToFloat64(gauge); got != 6 {
		t.Errorf("gauge %v, want 6 bytes unacknowledged", got)
	}

	// A session encodes what is queued, and later lines as they come.
	o.startEncoding(false)
	push("events", "e4", true)
	buf, n := o.take(nil)
	want := []string{"1 orders o1", "2 events e2", "3 orders o3", "4 events e4"}
	if got := frames(t, buf); n != 4 || fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("took %d frames %q, want %q", n, got, want)
	}
	if o.sentSeq != 4 {
		t.Errorf("sentSeq %d after taking 4 frames, want 4", o.sentSeq)
	}

	// The receiver acknowledges 1: it leaves, and the bytes of orders with it.
	o.ack(1)
	if o.len() != 3 || o.channel("orders").bound.Bytes() != 2 || o.channel("events").bound.Bytes() != 4 {
		t.Errorf("after ACK 1: %d queued, orders %d bytes, events %d bytes; want 3, 2, 4",
			o.len(), o.channel("orders").bound.Bytes(), o.channel("events").bound.Bytes())
	}
	o.stopEncoding()

	// A line queued while no session is up, then the receiver turns out to have
	// restarted: what it may have seen (up to sentSeq) is settled, the rest kept.
	push("orders", "o5", false)
	reroute, drops := o.settle(sentUpTo(o.sentSeq))
	var rerouted []string
	for _, m := range reroute {
		rerouted = append(rerouted, m.Channel+" "+string(m.Data))
	}
	if fmt.Sprint(rerouted) != "[events e2 events e4]" {
		t.Errorf("rerouted %q, want the AnyOne lines e2, e4", rerouted)
	}
	if fmt.Sprint(drops) != "map[orders:1]" {
		t.Errorf("drops %v, want orders:1 (o3)", drops)
	}
	if got := testutil.ToFloat64(gauge); got != 2 {
		t.Errorf("gauge %v after settling, want 2 (o5)", got)
	}

	// The next session resends from the oldest line left.
	o.startEncoding(false)
	buf, _ = o.take(nil)
	if got := frames(t, buf); fmt.Sprint(got) != "[5 orders o5]" {
		t.Errorf("next session sent %q, want [5 orders o5]", got)
	}
	o.ack(5)
	if o.len() != 0 || testutil.ToFloat64(gauge) != 0 {
		t.Errorf("%d lines and %v bytes left after ACK 5", o.len(), testutil.ToFloat64(gauge))
	}
	if n := chunk.Refs(); n != 1 {
		t.Fatalf("the chunk has %d references after every line left, want 1 (the test's)", n)
	}
	chunk.Release(1)
}

// TestOutboxEncodesAheadOnlySoFar: while the writer has not taken them, frames are
// encoded ahead only up to maxOutBytes; the rest wait in the queue and are encoded, in
// order, when the writer takes the batch.
func TestOutboxEncodesAheadOnlySoFar(t *testing.T) {
	var mu sync.Mutex
	closed := false
	var o outbox
	o.init(prometheus.NewGauge(prometheus.GaugeOpts{Name: "unacked"}), nil, &mu, &closed)
	o.startEncoding(false)
	line := bytes.Repeat([]byte("x"), 60<<10)
	const lines = 2 * maxOutBytes / (60 << 10)
	for range lines {
		o.push(o.channel("orders"), nil, line, router.Line, false)
	}
	if len(o.out) > maxOutBytes+len(line)+DataOverhead {
		t.Fatalf("%d bytes encoded ahead, want at most about %d", len(o.out), maxOutBytes)
	}
	if o.next >= lines {
		t.Fatalf("all %d lines encoded ahead", lines)
	}
	total := 0
	var last uint64
	for total < lines {
		buf, n := o.take(nil)
		if n == 0 {
			t.Fatalf("writer got nothing with %d of %d lines taken", total, lines)
		}
		for _, f := range frames(t, buf) {
			var seq uint64
			_, _ = fmt.Sscan(f, &seq)
			if seq != last+1 {
				t.Fatalf("frame %d after %d", seq, last)
			}
			last = seq
		}
		total += n
	}
}

// runFrames decodes the DATA and RUN frames of buf as "seq channel payload", one entry
// per message (a RUN's split at its delimiters), and counts the RUN frames.
func runFrames(t *testing.T, buf []byte) (got []string, runs int) {
	t.Helper()
	r := NewReader(bytes.NewReader(buf), MaxFrameBytes)
	defer r.Close()
	for {
		typ, body, err := r.Next()
		if err != nil {
			return got, runs
		}
		switch typ {
		case FrameData:
			d, err := ParseData(body)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, fmt.Sprintf("%d %s %s", d.Seq, d.Channel, d.Payload))
		case FrameRun:
			run, err := ParseRun(body)
			if err != nil {
				t.Fatal(err)
			}
			runs++
			seq := run.Seq
			for _, l := range bytes.SplitAfter(run.Payload, []byte{'\n'}) {
				if len(l) > 0 {
					got = append(got, fmt.Sprintf("%d %s %s", seq, run.Channel, l[:len(l)-1]))
					seq++
				}
			}
		default:
			t.Fatalf("frame type %d", typ)
		}
	}
}

// TestOutboxRuns: a run of lines is one entry numbered like the lines it holds. A
// version-2 session gets it as one RUN frame, a version-1 session as a DATA frame per
// line with the same sequence numbers; an acknowledgement inside a run leaves its rest
// queued, resent exactly once; a restarted receiver's settling counts every line of a
// run; every chunk reference is released exactly once.
func TestOutboxRuns(t *testing.T) {
	var mu sync.Mutex
	closed := false
	var o outbox
	o.init(prometheus.NewGauge(prometheus.GaugeOpts{Name: "unacked"}), nil, &mu, &closed)
	var slab buffer.Slab
	batch := func(lines ...string) []buffer.Payload {
		var b []buffer.Payload
		for _, l := range lines {
			b = append(b, slab.CopyLine([]byte(l), '\n'))
		}
		return b
	}
	queue := func(lines []buffer.Payload) {
		n, run := buffer.Run(lines, '\n', MaxRunBytes, maxRunCount)
		if n != len(lines) {
			t.Fatalf("a run of %d of %d lines", n, len(lines))
		}
		lines[0].Ref.Retain(1)
		o.pushRun(o.channel("orders"), lines[0].Ref, run, n, router.Line, false)
	}
	queue(batch("a", "b", "c"))
	o.push(o.channel("orders"), nil, []byte("d"), router.Line, false)
	queue(batch("e", "f"))
	if o.len() != 3 || o.nextSeq != 7 {
		t.Fatalf("%d entries, next seq %d; want 3 entries for 6 lines, next 7", o.len(), o.nextSeq)
	}
	slab.Recycle()

	o.startEncoding(true)
	buf, n := o.take(nil)
	got, runs := runFrames(t, buf)
	want := "[1 orders a 2 orders b 3 orders c 4 orders d 5 orders e 6 orders f]"
	if n != 6 || runs != 2 || fmt.Sprint(got) != want {
		t.Fatalf("version 2: took %d lines in %d RUN frames: %q; want 6 in 2: %s", n, runs, got, want)
	}
	o.stopEncoding()

	// An acknowledgement inside the first run (a receiver never sends one, but the
	// sender must not resend what it covers), then a version-1 session.
	o.ack(2)
	if got := o.channel("orders").bound.Bytes(); got != len("c")+len("d")+len("e\nf\n") {
		t.Errorf("%d bytes queued after ACK 2, want those of c (alone now, so without its delimiter), d, e, f", got)
	}
	o.startEncoding(false)
	buf, _ = o.take(nil)
	got, runs = runFrames(t, buf)
	if want := "[3 orders c 4 orders d 5 orders e 6 orders f]"; runs != 0 || fmt.Sprint(got) != want {
		t.Fatalf("version 1 after ACK 2: %q in %d RUN frames; want %s in DATA frames only", got, runs, want)
	}
	o.stopEncoding()

	// The receiver restarted: both runs' lines it may have seen are counted.
	_, drops := o.settle(sentUpTo(o.sentSeq))
	if fmt.Sprint(drops) != "map[orders:4]" || o.len() != 0 || o.unacked != 0 {
		t.Fatalf("settled drops %v, %d entries and %d bytes left; want orders:4, none", drops, o.len(), o.unacked)
	}
	slab.Close()
}

// TestOutboxRenumbersRuns: a queue renumbered to continue after a receiver's lastSeq
// numbers a run's lines one by one.
func TestOutboxRenumbersRuns(t *testing.T) {
	var mu sync.Mutex
	closed := false
	var o outbox
	o.init(prometheus.NewGauge(prometheus.GaugeOpts{Name: "unacked"}), nil, &mu, &closed)
	o.pushRun(o.channel("orders"), nil, []byte("a\nb\nc\n"), 3, router.Line, false)
	o.push(o.channel("orders"), nil, []byte("d"), router.Line, false)
	if err := o.renumber(10); err != nil {
		t.Fatal(err)
	}
	o.startEncoding(true)
	buf, _ := o.take(nil)
	if got, _ := runFrames(t, buf); fmt.Sprint(got) != "[11 orders a 12 orders b 13 orders c 14 orders d]" {
		t.Fatalf("after renumbering from 10: %q", got)
	}
	if o.nextSeq != 15 {
		t.Fatalf("next seq %d, want 15", o.nextSeq)
	}
}
