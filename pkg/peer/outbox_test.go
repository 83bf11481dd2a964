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
