package peer

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/pkg/router"
)

func sampleStream() []byte {
	var b []byte
	b = append(b, Hello{MinVersion: 1, MaxVersion: 2, Pod: Identity{"ns", "pod-a", "uid-a", 42}, Channels: []string{"orders", "events"}}.Frame()...)
	b = append(b, Welcome{Version: 1, Pod: Identity{"ns", "pod-b", "uid-b", 7}, Known: true, LastSeq: 99, Presence: map[string]int{"orders": 2}}.Frame()...)
	b = AppendDataHeader(b, 100, "orders", router.NodeIPC, 5)
	b = append(b, "hello"...)
	b = AckFrame(b, 100)
	b = appendRun(b, 101, 3, newChanState("events").tail[router.Line], []byte("a\n\nc\n"))
	b = append(b, PresenceFrame(map[string]int{"orders": 0, "events": 3})...)
	b = append(b, PingFrame()...)
	b = append(b, ReasonFrame(FrameGoodbye, "shutdown")...)
	return b
}

// TestCodecRoundTrip: every frame type decodes to what was encoded.
func TestCodecRoundTrip(t *testing.T) {
	r := NewReader(bytes.NewReader(sampleStream()), MaxFrameBytes)
	next := func(want FrameType) []byte {
		t.Helper()
		typ, body, err := r.Next()
		if err != nil || typ != want {
			t.Fatalf("Next = %d, %v; want type %d", typ, err, want)
		}
		return body
	}
	h, err := ParseHello(next(FrameHello))
	if err != nil || !reflect.DeepEqual(h, Hello{1, 2, Identity{"ns", "pod-a", "uid-a", 42}, []string{"orders", "events"}}) {
		t.Fatalf("hello = %+v, %v", h, err)
	}
	w, err := ParseWelcome(next(FrameWelcome))
	if err != nil || !reflect.DeepEqual(w, Welcome{1, Identity{"ns", "pod-b", "uid-b", 7}, true, 99, map[string]int{"orders": 2}}) {
		t.Fatalf("welcome = %+v, %v", w, err)
	}
	d, err := ParseData(next(FrameData))
	if err != nil || d.Seq != 100 || string(d.Channel) != "orders" || d.Kind != router.NodeIPC || string(d.Payload) != "hello" {
		t.Fatalf("data = %+v, %v", d, err)
	}
	if a, err := ParseAck(next(FrameAck)); err != nil || a != 100 {
		t.Fatalf("ack = %d, %v", a, err)
	}
	if run, err := ParseRun(next(FrameRun)); err != nil || run.Seq != 101 || run.Count != 3 || run.Last() != 103 ||
		string(run.Channel) != "events" || run.Kind != router.Line || string(run.Payload) != "a\n\nc\n" {
		t.Fatalf("run = %+v, %v", run, err)
	}
	if p, err := ParsePresence(next(FramePresence)); err != nil || !reflect.DeepEqual(p, map[string]int{"orders": 0, "events": 3}) {
		t.Fatalf("presence = %v, %v", p, err)
	}
	next(FramePing)
	if s, err := ParseReason(next(FrameGoodbye)); err != nil || s != "shutdown" {
		t.Fatalf("goodbye = %q, %v", s, err)
	}
	if _, _, err := r.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("end = %v, want EOF", err)
	}
}

// TestReaderRejectsOversizedFrame: a length beyond the bound is an error, not an
// allocation.
func TestReaderRejectsOversizedFrame(t *testing.T) {
	r := NewReader(bytes.NewReader([]byte{0xff, 0xff, 0xff, 0xff, 4}), maxHandshakeBytes)
	if _, _, err := r.Next(); !errors.Is(err, ErrFrame) {
		t.Fatalf("err = %v, want ErrFrame", err)
	}
}

// oneByteReader returns one byte per Read, to split frames at every byte.
type oneByteReader struct{ r io.Reader }

func (o oneByteReader) Read(p []byte) (int, error) { return o.r.Read(p[:1]) }

// FuzzDecode feeds arbitrary bytes to the reader and every body parser; none may
// panic, and a valid stream split at every byte decodes the same.
func FuzzDecode(f *testing.F) {
	s := sampleStream()
	f.Add(s)
	for i := range s {
		f.Add(s[:i])
		f.Add(s[i:])
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		whole := decodeAll(NewReader(bytes.NewReader(b), MaxFrameBytes))
		split := decodeAll(NewReader(oneByteReader{bytes.NewReader(b)}, MaxFrameBytes))
		if !reflect.DeepEqual(whole, split) {
			t.Fatalf("split reads decode differently:\n%v\n%v", whole, split)
		}
	})
}

func decodeAll(r *Reader) []string {
	var out []string
	for {
		typ, body, err := r.Next()
		if err != nil {
			return append(out, "err")
		}
		var v any
		switch typ {
		case FrameHello:
			v, err = ParseHello(body)
		case FrameWelcome:
			v, err = ParseWelcome(body)
		case FrameData:
			var d Data
			d, err = ParseData(body)
			v = []any{d.Seq, string(d.Channel), d.Kind, string(d.Payload)}
		case FrameRun:
			var r Run
			r, err = ParseRun(body)
			v = []any{r.Seq, r.Count, string(r.Channel), r.Kind, string(r.Payload)}
		case FrameAck:
			v, err = ParseAck(body)
		case FramePresence:
			v, err = ParsePresence(body)
		case FrameRefuse, FrameGoodbye:
			v, err = ParseReason(body)
		}
		out = append(out, fmt.Sprintf("%d %v", typ, v), errString(err))
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// chunkyReader returns reads of varying sizes, so frames straddle the reader's chunks.
type chunkyReader struct {
	r io.Reader
	i int
}

func (c *chunkyReader) Read(p []byte) (int, error) {
	c.i++
	n := min(len(p), 1+(c.i*7919)%9000)
	return c.r.Read(p[:n])
}

// scriptedReader returns its pieces in order, each in as many reads as the reader's
// room takes, and records the room every read was offered.
type scriptedReader struct {
	pieces  [][]byte
	offered []int
}

func (s *scriptedReader) Read(p []byte) (int, error) {
	s.offered = append(s.offered, len(p))
	if len(s.pieces) == 0 {
		return 0, io.EOF
	}
	n := copy(p, s.pieces[0])
	if s.pieces[0] = s.pieces[0][n:]; len(s.pieces[0]) == 0 {
		s.pieces = s.pieces[1:]
	}
	return n, nil
}

// stepClock is a reader's clock that moves by step at every reading.
type stepClock struct {
	t    time.Time
	step time.Duration
}

func (c *stepClock) now() time.Time { c.t = c.t.Add(c.step); return c.t }

// TestReaderWaitsQuietInASmallChunk: a sidecar has two readers per peer, most of them on
// quiet links; a quiet reader (its reads small and a second apart) waits for its next
// read in a small chunk (1 KiB, not 64), takes a full chunk as soon as traffic fills the
// small one, and goes back when the link is quiet again, every frame intact across the
// moves.
func TestReaderWaitsQuietInASmallChunk(t *testing.T) {
	var burst []byte
	var want [][]byte
	for i := range 200 {
		p := bytes.Repeat([]byte{byte('a' + i%26)}, 1000)
		burst = append(AppendDataHeader(burst, uint64(i+1), "bench", router.Line, len(p)), p...)
		want = append(want, p)
	}
	src := &scriptedReader{pieces: [][]byte{PingFrame(), PingFrame(), burst, PingFrame(), PingFrame()}}
	r := NewReader(src, MaxFrameBytes)
	defer r.Close()
	r.src.now = (&stepClock{step: time.Second}).now
	for i := range 2 {
		if typ, _, err := r.Next(); err != nil || typ != FramePing {
			t.Fatalf("ping %d: type %d, %v", i, typ, err)
		}
	}
	for i := range want {
		typ, body, err := r.Next()
		if err != nil || typ != FrameData {
			t.Fatalf("frame %d: type %d, %v", i, typ, err)
		}
		if d, err := ParseData(body); err != nil || d.Seq != uint64(i+1) || !bytes.Equal(d.Payload, want[i]) {
			t.Fatalf("frame %d: seq %d, %d bytes, %v", i, d.Seq, len(d.Payload), err)
		}
	}
	for i := range 2 {
		if typ, _, err := r.Next(); err != nil || typ != FramePing {
			t.Fatalf("ping %d after the burst: type %d, %v", i, typ, err)
		}
	}
	if _, _, err := r.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("end of stream: %v", err)
	}
	o := src.offered
	if o[0] > buffer.SmallChunkSize || o[1] > buffer.SmallChunkSize || o[len(o)-1] > buffer.SmallChunkSize {
		t.Errorf("a quiet reader was offered %d, %d and, at the end, %d bytes of room: want at most %d (offers %v)",
			o[0], o[1], o[len(o)-1], buffer.SmallChunkSize, o)
	}
	if big := slices.Max(o); big < buffer.ChunkSize/2 {
		t.Errorf("during a 200 KB burst the largest read offered %d bytes: the reader never took a full chunk (offers %v)", big, o)
	}
}

// TestReaderKeepsItsChunkOnABusyLink: small reads that come one right after another are
// a busy link, not a quiet one (acknowledgements under load, lines trickling in as fast
// as they are sent): the reader stays in its full chunk instead of cutting the stream
// into small ones.
func TestReaderKeepsItsChunkOnABusyLink(t *testing.T) {
	var burst []byte
	for i := range 100 {
		burst = append(AppendDataHeader(burst, uint64(i+1), "bench", router.Line, 1000), bytes.Repeat([]byte{'x'}, 1000)...)
	}
	pieces := [][]byte{burst}
	for range 50 {
		pieces = append(pieces, AckFrame(nil, 7))
	}
	src := &scriptedReader{pieces: pieces}
	r := NewReader(src, MaxFrameBytes)
	defer r.Close()
	r.src.now = (&stepClock{step: time.Microsecond}).now
	for i := range 150 {
		if _, _, err := r.Next(); err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
	}
	if _, _, err := r.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("end of stream: %v", err)
	}
	first := slices.IndexFunc(src.offered, func(n int) bool { return n > buffer.SmallChunkSize })
	if first < 0 {
		t.Fatalf("the burst never got a full chunk (offers %v)", src.offered)
	}
	for i, n := range src.offered[first:] {
		if n <= buffer.SmallChunkSize {
			t.Fatalf("read %d after the burst was offered %d bytes: a busy link moved to a small chunk (offers %v)",
				first+i, n, src.offered)
		}
	}
}

// TestReaderKeepsRetainedFrames: the receiving sidecar queues a line in place, holding a
// reference on the reader's chunk; whatever the reader reads afterwards, into new chunks
// or (for frames larger than a chunk) buffers of their own, that line's bytes must not
// change until the reference is released.
func TestReaderKeepsRetainedFrames(t *testing.T) {
	var stream []byte
	var want [][]byte
	for i := range 3000 {
		size := 1 + (i*131)%700
		if i%1000 == 999 {
			size = buffer.ChunkSize + 1000 // a frame no chunk can hold
		}
		p := bytes.Repeat([]byte{byte('a' + i%26)}, size)
		stream = AppendDataHeader(stream, uint64(i+1), "bench", router.Line, len(p))
		stream = append(stream, p...)
		want = append(want, p)
	}
	r := NewReader(&chunkyReader{r: bytes.NewReader(stream)}, MaxFrameBytes)
	defer r.Close()
	type held struct {
		payload []byte
		chunk   *buffer.Chunk
		i       int
	}
	var kept []held
	for i := range want {
		typ, body, err := r.Next()
		if err != nil || typ != FrameData {
			t.Fatalf("frame %d: type %d, %v", i, typ, err)
		}
		d, err := ParseData(body)
		if err != nil || d.Seq != uint64(i+1) || !bytes.Equal(d.Payload, want[i]) {
			t.Fatalf("frame %d: seq %d, %d bytes, %v", i, d.Seq, len(d.Payload), err)
		}
		c := r.Chunk()
		if large := len(want[i]) > buffer.ChunkSize; large != (c == nil) {
			t.Fatalf("frame %d of %d bytes: chunk %p", i, len(want[i]), c)
		}
		if i%10 == 0 {
			c.Retain(1)
			kept = append(kept, held{d.Payload, c, i})
		}
	}
	for _, h := range kept {
		if !bytes.Equal(h.payload, want[h.i]) {
			t.Fatalf("frame %d changed after later reads", h.i)
		}
		h.chunk.Release(1)
	}
	if _, _, err := r.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("end of stream: %v", err)
	}
}

// TestAppendDataMatchesHeader: the frames a link's outbox encodes (appendData, with the
// channel's tail encoded once) are byte for byte the DATA frames of the protocol
// (AppendDataHeader and the payload), at every sequence number length, for both kinds
// and for a channel name of the longest length, and a reader decodes them back.
func TestAppendDataMatchesHeader(t *testing.T) {
	long := strings.Repeat("c", maxLabelBytes)
	var got, want []byte
	var msgs []Data
	for _, name := range []string{"orders", long} {
		st := newChanState(name)
		for _, kind := range []router.Kind{router.Line, router.NodeIPC} {
			for _, seq := range []uint64{1, 127, 128, 16383, 16384, 1<<35 + 3, maxResumeSeq + 99} {
				payload := []byte(fmt.Sprintf("line %d of %s", seq, kind))
				got = appendData(got, seq, st.tail[kind], payload)
				want = append(AppendDataHeader(want, seq, name, kind, len(payload)), payload...)
				msgs = append(msgs, Data{Seq: seq, Channel: []byte(name), Kind: kind, Payload: payload})
			}
		}
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("appendData encoded\n%x\nwant\n%x", got, want)
	}
	r := NewReader(bytes.NewReader(got), MaxFrameBytes)
	for _, m := range msgs {
		typ, body, err := r.Next()
		if err != nil || typ != FrameData {
			t.Fatalf("Next = %d, %v", typ, err)
		}
		d, err := ParseData(body)
		if err != nil || !reflect.DeepEqual(d, m) {
			t.Fatalf("ParseData = %+v, %v; want %+v", d, err, m)
		}
	}
}

// FuzzParseRun: whatever a RUN body holds, ParseRun does not panic, and a body it
// accepts splits at its delimiters into exactly Count messages, none holding the
// delimiter, numbered without wrapping.
func FuzzParseRun(f *testing.F) {
	f.Add(appendRun(nil, 1, 3, newChanState("orders").tail[router.Line], []byte("a\nb\n\n"))[headerLen:])
	f.Add(appendRun(nil, 1<<63, 2, newChanState("x").tail[router.NodeIPC], []byte("{}\f{}\f"))[headerLen:])
	f.Add([]byte{1, 0, 1, 'a', 0, '\n'})
	f.Fuzz(func(t *testing.T, body []byte) {
		r, err := ParseRun(body)
		if err != nil {
			return
		}
		if r.Count < 1 || r.Last() < r.Seq {
			t.Fatalf("accepted a run of %d from %d", r.Count, r.Seq)
		}
		parts := bytes.Split(r.Payload, []byte{r.Kind.Delimiter()})
		if len(parts) != r.Count+1 || len(parts[r.Count]) != 0 {
			t.Fatalf("accepted %q as %d messages", r.Payload, r.Count)
		}
	})
}
