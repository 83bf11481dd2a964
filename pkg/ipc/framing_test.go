package ipc_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/podipc/podipc/pkg/ipc"
)

// chunks is an io.Reader that returns each of its parts in a separate Read, so a test
// decides exactly where the stream is split.
type chunks struct{ parts [][]byte }

func (c *chunks) Read(p []byte) (int, error) {
	for len(c.parts) > 0 && len(c.parts[0]) == 0 {
		c.parts = c.parts[1:]
	}
	if len(c.parts) == 0 {
		return 0, io.EOF
	}
	n := copy(p, c.parts[0])
	c.parts[0] = c.parts[0][n:]
	return n, nil
}

func splitAt(data []byte, cut int) io.Reader {
	return &chunks{parts: [][]byte{bytes.Clone(data[:cut]), bytes.Clone(data[cut:])}}
}

// readAll collects every message until the first error that is not ErrMalformed, and
// counts the malformed frames on the way.
func readAll(r *ipc.Reader) (msgs []string, malformed int, err error) {
	for {
		m, err := r.Next()
		switch {
		case errors.Is(err, ipc.ErrMalformed):
			malformed++
		case err != nil:
			return msgs, malformed, err
		default:
			msgs = append(msgs, string(m))
		}
	}
}

func TestReaderSplitAtEveryByte(t *testing.T) {
	tests := map[string]struct {
		framing   ipc.Framing
		stream    string
		want      []string
		malformed int
	}{
		"lines": {
			framing: ipc.Lines,
			stream:  "alpha\nbeta\r\n\n\r\ngamma\rdelta\nunterminated",
			want:    []string{"alpha", "beta", "", "", "gamma\rdelta", "unterminated"},
		},
		"lines ending with CR at EOF": {
			framing: ipc.Lines,
			stream:  "a\nb\r",
			want:    []string{"a", "b"},
		},
		"node-ipc": {
			framing:   ipc.NodeIPC,
			stream:    `{"type":"a","data":1}` + "\f" + `bad` + "\f" + `{"data":{"type":"x"},"type":"b"}` + "\f" + `{"type":"tail"}`,
			want:      []string{`{"type":"a","data":1}`, `{"data":{"type":"x"},"type":"b"}`, `{"type":"tail"}`},
			malformed: 1,
		},
		"node-ipc with a malformed tail": {
			framing:   ipc.NodeIPC,
			stream:    `{"type":"a"}` + "\f" + `{"type":"cut`,
			want:      []string{`{"type":"a"}`},
			malformed: 1,
		},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			for cut := range len(tt.stream) + 1 {
				for _, src := range []io.Reader{
					splitAt([]byte(tt.stream), cut),
					iotest.OneByteReader(strings.NewReader(tt.stream)),
					iotest.DataErrReader(splitAt([]byte(tt.stream), cut)),
				} {
					got, malformed, err := readAll(ipc.NewReader(src, tt.framing, 64))
					if !errors.Is(err, io.EOF) {
						t.Fatalf("cut %d: ended with %v, want io.EOF", cut, err)
					}
					if strings.Join(got, "|") != strings.Join(tt.want, "|") || malformed != tt.malformed {
						t.Fatalf("cut %d: got %q with %d malformed, want %q with %d", cut, got, malformed, tt.want, tt.malformed)
					}
				}
			}
		})
	}
}

func TestReaderStopsAtTheLimitWithBoundedMemory(t *testing.T) {
	for _, limit := range []int{10, 1 << 20} {
		for _, f := range []ipc.Framing{ipc.Lines, ipc.NodeIPC} {
			counter := &countingReader{r: endless{}}
			r := ipc.NewReader(counter, f, limit)
			_, err := r.Next()
			if !errors.Is(err, ipc.ErrMessageTooLarge) {
				t.Fatalf("%v limit %d: Next = %v, want ErrMessageTooLarge", f, limit, err)
			}
			// Reading stops once the buffer (the initial 64 KiB, or the limit when
			// larger) holds more than one message can: memory is bounded by the limit.
			if most := max(limit+2, 64<<10); counter.n > most {
				t.Errorf("%v limit %d: read %d bytes before giving up, want at most %d", f, limit, counter.n, most)
			}
			// The error is sticky: the stream cannot be resynchronised.
			if _, err := r.Next(); !errors.Is(err, ipc.ErrMessageTooLarge) {
				t.Errorf("%v: second Next = %v, want ErrMessageTooLarge again", f, err)
			}
		}
	}
}

type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

func TestReaderLimitIsInclusive(t *testing.T) {
	tests := map[string]struct {
		framing ipc.Framing
		stream  string
		want    []string
		tooBig  bool
	}{
		"line at the limit":             {ipc.Lines, "12345\n", []string{"12345"}, false},
		"line at the limit with CRLF":   {ipc.Lines, "12345\r\n", []string{"12345"}, false},
		"line at the limit without EOL": {ipc.Lines, "12345", []string{"12345"}, false},
		"line over the limit":           {ipc.Lines, "ok\n123456\nnever", []string{"ok"}, true},
		"unterminated over the limit":   {ipc.Lines, "123456", nil, true},
		"frame over the limit":          {ipc.NodeIPC, `{"type":"x"}` + "\f", nil, true},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			got, _, err := readAll(ipc.NewReader(strings.NewReader(tt.stream), tt.framing, 5))
			if strings.Join(got, "|") != strings.Join(tt.want, "|") {
				t.Errorf("got %q, want %q", got, tt.want)
			}
			if tt.tooBig != errors.Is(err, ipc.ErrMessageTooLarge) {
				t.Errorf("ended with %v", err)
			}
		})
	}
}

func TestReaderDropsPartialMessageOnFailure(t *testing.T) {
	boom := errors.New("boom")
	src := io.MultiReader(strings.NewReader("whole\npart"), iotest.ErrReader(boom))
	got, _, err := readAll(ipc.NewReader(src, ipc.Lines, 0))
	if strings.Join(got, "|") != "whole" || !errors.Is(err, boom) {
		t.Fatalf("got %q, %v; want [whole], boom", got, err)
	}
}

func TestReaderBuffered(t *testing.T) {
	r := ipc.NewReader(strings.NewReader("a\nb\nc"), ipc.Lines, 0)
	if _, err := r.Next(); err != nil {
		t.Fatal(err)
	}
	if got := r.Buffered(); got != len("b\nc") {
		t.Errorf("Buffered() = %d after the first line, want %d", got, len("b\nc"))
	}
}

func TestRawReaderChunks(t *testing.T) {
	data := []byte("0123456789abcdef")
	got, _, err := readAll(ipc.NewReader(bytes.NewReader(data), ipc.Raw, 5))
	if !errors.Is(err, io.EOF) || strings.Join(got, "") != string(data) {
		t.Fatalf("got %q, %v", got, err)
	}
	for _, c := range got {
		if len(c) > 5 {
			t.Errorf("chunk %q over the limit of 5", c)
		}
	}
}

func TestWriter(t *testing.T) {
	tests := map[string]struct {
		framing ipc.Framing
		msgs    []string
		want    string
		bad     []string
	}{
		"lines":    {ipc.Lines, []string{"a", "", "b c"}, "a\n\nb c\n", []string{"two\nlines", "\n"}},
		"node-ipc": {ipc.NodeIPC, []string{`{"type":"t","data":[1]}`, `{"type":"u"}`}, `{"type":"t","data":[1]}` + "\f" + `{"type":"u"}` + "\f", []string{`{}`, `{"type":1}`, "nope", "{\"type\":\"a\"}\f"}},
		"raw":      {ipc.Raw, []string{"ab", "\n", "c\f"}, "ab\nc\f", nil},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			for _, asString := range []bool{false, true} {
				var buf bytes.Buffer
				w := ipc.NewWriter(&buf, tt.framing)
				write := func(m string) error {
					if asString {
						return w.WriteMessageString(m)
					}
					return w.WriteMessage([]byte(m))
				}
				for i, m := range tt.msgs {
					if err := write(m); err != nil {
						t.Fatal(err)
					}
					if i < len(tt.bad) {
						if err := write(tt.bad[i]); !errors.Is(err, ipc.ErrUnframeable) {
							t.Errorf("writing %q: %v, want ErrUnframeable", tt.bad[i], err)
						}
					}
				}
				if buf.Len() != 0 {
					t.Error("wrote before Flush")
				}
				if w.Buffered() != len(tt.want) {
					t.Errorf("Buffered() = %d, want %d", w.Buffered(), len(tt.want))
				}
				if err := w.Flush(); err != nil {
					t.Fatal(err)
				}
				if buf.String() != tt.want {
					t.Errorf("wrote %q, want %q", buf.String(), tt.want)
				}
			}
		})
	}
}

// TestWriterRun: n lines each ended by a line break are written as n WriteMessage calls
// would write them; a count that does not match the line breaks, a run not ended by one,
// an empty one, or a framing other than Lines writes nothing and is unframeable.
func TestWriterRun(t *testing.T) {
	var buf bytes.Buffer
	w := ipc.NewWriter(&buf, ipc.Lines)
	for _, tc := range []struct {
		run string
		n   int
	}{{"", 1}, {"a", 1}, {"a\nb", 2}, {"a\nb\n", 1}, {"a\n", 0}, {"two\nlines\n", 3}} {
		if err := w.WriteRun([]byte(tc.run), tc.n); !errors.Is(err, ipc.ErrUnframeable) {
			t.Errorf("WriteRun(%q, %d) = %v, want ErrUnframeable", tc.run, tc.n, err)
		}
	}
	for _, run := range []string{"a\n\nb c\n", "x\n"} {
		if err := w.WriteRun([]byte(run), strings.Count(run, "\n")); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := buf.String(); got != "a\n\nb c\nx\n" {
		t.Fatalf("wrote %q", got)
	}
	n := ipc.NewWriter(&buf, ipc.NodeIPC)
	if err := n.WriteRun([]byte(`{"type":"a"}`+"\f"), 1); !errors.Is(err, ipc.ErrUnframeable) {
		t.Fatalf("WriteRun on NodeIPC framing = %v, want ErrUnframeable", err)
	}
}

func TestEncodeDecodeEvent(t *testing.T) {
	tests := map[string]struct {
		typ     string
		data    any
		encoded string
	}{
		"string":       {"message", "hi <&>", `{"type":"message","data":"hi <&>"}`},
		"object":       {"o", map[string]int{"n": 1}, `{"type":"o","data":{"n":1}}`},
		"raw, compact": {"r", json.RawMessage(`[ 1, 2 ]`), `{"type":"r","data":[1,2]}`},
		"nil":          {"n", nil, `{"type":"n","data":null}`},
		"escaped type": {"a\"b\\c\n<\u2028\x7f", 1, `{"type":"a\"b\\c\n<\u2028` + "\x7f" + `","data":1}`},
		"long data":    {"l", strings.Repeat("d", 300), `{"type":"l","data":"` + strings.Repeat("d", 300) + `"}`},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			b, err := ipc.EncodeEvent(tt.typ, tt.data)
			if err != nil || string(b) != tt.encoded {
				t.Fatalf("EncodeEvent = %s, %v; want %s", b, err, tt.encoded)
			}
			ev, err := ipc.DecodeEvent(b)
			if err != nil || ev.Type != tt.typ {
				t.Fatalf("DecodeEvent = %+v, %v", ev, err)
			}
			var want bytes.Buffer
			if err := json.Compact(&want, []byte(tt.encoded[strings.Index(tt.encoded, `"data":`)+7:len(tt.encoded)-1])); err != nil {
				t.Fatal(err)
			}
			if string(ev.Data) != want.String() {
				t.Errorf("Data = %s, want %s", ev.Data, want.String())
			}
		})
	}
	if _, err := ipc.EncodeEvent("bad", func() {}); err == nil {
		t.Error("EncodeEvent accepted a func")
	}
}

func TestDecodeEventFollowsJSONParse(t *testing.T) {
	tests := map[string]struct {
		msg      string
		typ      string
		data     string
		rejected bool
	}{
		"absent data":          {msg: `{"type":"t"}`, typ: "t"},
		"last duplicate wins":  {msg: `{"type":1,"type":"second","data":2}`, typ: "second", data: "2"},
		"keys are exact":       {msg: `{"TYPE":"x","type":"y"}`, typ: "y"},
		"escaped key":          {msg: `{"\u0074ype":"esc"}`, typ: "esc"},
		"only a different key": {msg: `{"Type":"x"}`, rejected: true},
		"null type":            {msg: `{"type":null}`, rejected: true},
		"array":                {msg: `[{"type":"x"}]`, rejected: true},
		"trailing garbage":     {msg: `{"type":"x"} x`, rejected: true},
		"empty":                {msg: ``, rejected: true},
		"null data":            {msg: `{"type":"t","data":null}`, typ: "t", data: "null"},
		"spaced data":          {msg: ` { "data" : [ 1 , 2 ] , "type" : "t" } `, typ: "t", data: "[ 1 , 2 ]"},
		"escaped type":         {msg: `{"type":"a\u0062\n"}`, typ: "ab\n"},
		"invalid UTF-8 type":   {msg: "{\"type\":\"a\xffb\"}", typ: "a\ufffdb"},
		"escaped data key":     {msg: `{"type":"t","\u0064ata":1}`, typ: "t", data: "1"},
		"leading zero":         {msg: `{"type":"t","data":01}`, rejected: true},
		"control character":    {msg: "{\"type\":\"a\tb\"}", rejected: true},
		"bad escape":           {msg: `{"type":"\q"}`, rejected: true},
		"unclosed data":        {msg: `{"type":"t","data":[1}`, rejected: true},
		"nesting at the limit": {msg: `{"type":"t","data":` + strings.Repeat("[", 9999) + strings.Repeat("]", 9999) + "}", typ: "t", data: strings.Repeat("[", 9999) + strings.Repeat("]", 9999)},
		"nesting over it":      {msg: `{"type":"t","data":` + strings.Repeat("[", 10000) + strings.Repeat("]", 10000) + "}", rejected: true},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			ev, err := ipc.DecodeEvent([]byte(tt.msg))
			if tt.rejected {
				if !errors.Is(err, ipc.ErrMalformed) {
					t.Fatalf("DecodeEvent = %+v, %v; want ErrMalformed", ev, err)
				}
				return
			}
			if err != nil || ev.Type != tt.typ || string(ev.Data) != tt.data {
				t.Fatalf("DecodeEvent = {%q %s}, %v; want {%q %s}", ev.Type, ev.Data, err, tt.typ, tt.data)
			}
		})
	}
}

// TestDecodeEventEveryStringByte puts every byte value at every position of a string
// long enough for the scanner's eight-bytes-at-a-time path, in the type and in the data,
// and checks DecodeEvent and the Writer against encoding/json.
func TestDecodeEventEveryStringByte(t *testing.T) {
	for c := range 256 {
		for pos := range 17 {
			s := []byte(strings.Repeat("a", 17))
			s[pos] = byte(c)
			for _, msg := range []string{
				`{"type":"` + string(s) + `"}`,
				`{"type":"t","data":{"k":"` + string(s) + `"}}`,
			} {
				want, valid := referenceEvent([]byte(msg))
				ev, err := ipc.DecodeEvent([]byte(msg))
				if (err == nil) != valid || ev.Type != want.Type || string(ev.Data) != string(want.Data) {
					t.Fatalf("DecodeEvent(%q) = %+v, %v; encoding/json says %+v, valid=%v", msg, ev, err, want, valid)
				}
				if werr := ipc.NewWriter(io.Discard, ipc.NodeIPC).WriteMessageString(msg); (werr == nil) != valid {
					t.Fatalf("WriteMessageString(%q) = %v; encoding/json says valid=%v", msg, werr, valid)
				}
			}
		}
	}
}

func TestSocketPath(t *testing.T) {
	tests := map[string]struct{ root, appspace, id, want string }{
		"node-ipc defaults": {"", "", "world", "/tmp/app.world"},
		"podipc sidecar":    {"/var/run/podipc/", "", "orders", "/var/run/podipc/app.orders"},
		"custom appspace":   {"/x/", "my.", "id", "/x/my.id"},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			if got := ipc.SocketPath(tt.root, tt.appspace, tt.id); got != tt.want {
				t.Errorf("SocketPath = %q, want %q", got, tt.want)
			}
		})
	}
}
