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

// Each fuzz target reads the input whole, split at cut, and one byte at a time, and
// compares all three with a slow reference built on bytes.Split and encoding/json.
// fuzzLimit is small so that the size limit is reached often.
const fuzzLimit = 24

var (
	lineSeeds = []string{
		"alpha\nbeta\r\n\ngamma",
		"\r\n\r\r\n\n",
		strings.Repeat("x", fuzzLimit) + "\r\n" + strings.Repeat("y", fuzzLimit+1) + "\n",
	}
	nodeIPCSeeds = []string{
		`{"type":"a","data":1}` + "\f" + `x` + "\f" + `{"type":"b"}`,
		`{"data":{"type":1},"type":"s"}` + "\f\f" + `{"\u0074ype":"e"}` + "\f",
		`{"type":1,"type":"t"}` + "\f" + `[1]` + "\f" + `{"type":"`,
	}
)

// seed adds every sample split at every byte, as nats-server's parser fuzzing does.
func seed(f *testing.F, samples []string) {
	for _, s := range samples {
		for cut := range len(s) + 1 {
			f.Add([]byte(s), cut)
		}
	}
}

// result is what a Reader produced: messages, "!malformed" markers, and how it ended.
type result struct {
	msgs    []string
	tooBig  bool
	failure error
}

func read(src io.Reader, f ipc.Framing) result {
	var res result
	r := ipc.NewReader(src, f, fuzzLimit)
	for {
		m, err := r.Next()
		switch {
		case err == nil:
			res.msgs = append(res.msgs, string(m))
		case errors.Is(err, ipc.ErrMalformed):
			res.msgs = append(res.msgs, "!malformed")
		case errors.Is(err, ipc.ErrMessageTooLarge):
			res.tooBig = true
			return res
		case errors.Is(err, io.EOF):
			return res
		default:
			res.failure = err
			return res
		}
	}
}

// reference frames data the slow, obvious way. accept says whether a frame is valid
// and what it yields.
func reference(data []byte, delim byte, accept func([]byte) (string, bool)) result {
	var res result
	frames := bytes.Split(data, []byte{delim})
	if len(frames[len(frames)-1]) == 0 {
		frames = frames[:len(frames)-1] // the stream ended with a delimiter
	}
	for _, fr := range frames {
		msg, ok := accept(fr)
		if len(msg) > fuzzLimit {
			res.tooBig = true
			return res
		}
		if !ok {
			msg = "!malformed"
		}
		res.msgs = append(res.msgs, msg)
	}
	return res
}

func check(t *testing.T, data []byte, cut int, f ipc.Framing, want result) {
	t.Helper()
	cut = min(max(cut, 0), len(data))
	for name, src := range map[string]io.Reader{
		"whole":    bytes.NewReader(data),
		"split":    splitAt(data, cut),
		"one byte": iotest.OneByteReader(bytes.NewReader(data)),
	} {
		got := read(src, f)
		if got.failure != nil || got.tooBig != want.tooBig || strings.Join(got.msgs, "\x00") != strings.Join(want.msgs, "\x00") {
			t.Fatalf("%s: got %q (too big %v, %v), want %q (too big %v)", name, got.msgs, got.tooBig, got.failure, want.msgs, want.tooBig)
		}
	}
}

func FuzzLinesReader(f *testing.F) {
	seed(f, lineSeeds)
	f.Fuzz(func(t *testing.T, data []byte, cut int) {
		want := reference(data, '\n', func(fr []byte) (string, bool) {
			return string(bytes.TrimSuffix(fr, []byte{'\r'})), true
		})
		check(t, data, cut, ipc.Lines, want)
	})
}

func FuzzNodeIPCReader(f *testing.F) {
	seed(f, nodeIPCSeeds)
	f.Fuzz(func(t *testing.T, data []byte, cut int) {
		want := reference(data, '\f', func(fr []byte) (string, bool) {
			if len(fr) > fuzzLimit {
				return string(fr), false // reported as too large, whatever it holds
			}
			return string(fr), isEvent(fr)
		})
		check(t, data, cut, ipc.NodeIPC, want)
	})
}

// isEvent is JSON.parse's view of a node-ipc frame: an object whose "type" (last
// duplicate wins, keys exact) is a string.
func isEvent(b []byte) bool {
	var fields map[string]json.RawMessage
	if json.Unmarshal(b, &fields) != nil || fields == nil {
		return false
	}
	typ, ok := fields["type"]
	return ok && len(typ) > 0 && typ[0] == '"'
}

func FuzzRawReader(f *testing.F) {
	seed(f, append(lineSeeds, nodeIPCSeeds...))
	f.Fuzz(func(t *testing.T, data []byte, cut int) {
		cut = min(max(cut, 0), len(data))
		for name, src := range map[string]io.Reader{
			"whole":    bytes.NewReader(data),
			"split":    splitAt(data, cut),
			"one byte": iotest.OneByteReader(bytes.NewReader(data)),
		} {
			got := read(src, ipc.Raw)
			if got.failure != nil || got.tooBig {
				t.Fatalf("%s: ended with %v", name, got.failure)
			}
			if strings.Join(got.msgs, "") != string(data) {
				t.Fatalf("%s: chunks %q do not add up to the input", name, got.msgs)
			}
			for _, c := range got.msgs {
				if len(c) == 0 || len(c) > fuzzLimit {
					t.Fatalf("%s: chunk of %d bytes", name, len(c))
				}
			}
		}
	})
}

func FuzzDecodeEvent(f *testing.F) {
	for _, s := range nodeIPCSeeds {
		for _, fr := range strings.Split(s, "\f") {
			f.Add([]byte(fr))
		}
	}
	for _, s := range decodeSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, msg []byte) {
		ev, err := ipc.DecodeEvent(msg)
		want, valid := referenceEvent(msg)
		if (err == nil) != valid {
			t.Fatalf("DecodeEvent(%q) error %v, JSON.parse view says valid=%v", msg, err, valid)
		}
		// The Writer must refuse exactly what the Reader and DecodeEvent refuse.
		if werr := ipc.NewWriter(io.Discard, ipc.NodeIPC).WriteMessage(msg); (werr == nil) != valid {
			t.Fatalf("Writer.WriteMessage(%q) error %v, JSON.parse view says valid=%v", msg, werr, valid)
		}
		if err != nil {
			return
		}
		if ev.Type != want.Type || !bytes.Equal(ev.Data, want.Data) || (ev.Data == nil) != (want.Data == nil) {
			t.Fatalf("DecodeEvent(%q) = {%q %q}, encoding/json says {%q %q}", msg, ev.Type, ev.Data, want.Type, want.Data)
		}
		again, err := ipc.EncodeEvent(ev.Type, ev.Data)
		if err != nil {
			t.Fatalf("re-encoding %+v: %v", ev, err)
		}
		if want := referenceEncode(t, ev.Type, ev.Data); !bytes.Equal(again, want) {
			t.Fatalf("EncodeEvent(%q, %q) = %q, encoding/json says %q", ev.Type, ev.Data, again, want)
		}
		if ev2, err := ipc.DecodeEvent(again); err != nil || ev2.Type != ev.Type {
			t.Fatalf("round trip of %q: %+v, %v", msg, ev2, err)
		}
	})
}

// decodeSeeds reach the corners of the JSON grammar that DecodeEvent's own scanner must
// judge exactly as encoding/json does.
var decodeSeeds = []string{
	` { "type" : "a" , "data" : [ 1 , -0.5e+3 , true , false , null , { } , [ ] ] } `,
	`{"type":"\u00e9\n\"\\\/\b\f\r\t","data":"\uD83D\uDE00"}`,
	`{"type":"\ud800","data":{"a":{"b":[[{"c":"d"}]]}}}`,
	"{\"type\":\"\xff\xfe\",\"data\":\"\xc3\xa9\"}",
	`{"type":"t","data":01}`,
	`{"type":"t","data":1.}`,
	`{"type":"t","data":-}`,
	`{"type":"t","data":1e}`,
	`{"type":"t","data":tru}`,
	`{"type":"t","data":[1,]}`,
	`{"type":"t","data":{"a":1,}}`,
	`{"type":"t",}`,
	`{"type":"\x"}`,
	`{"type":"\u12G4"}`,
	`{"\u0064ata":5,"type":"t","data":6}`,
}

// referenceEvent is DecodeEvent the slow way, through a map as JSON.parse would build
// it: valid is false unless msg is an object whose "type" is a string.
func referenceEvent(msg []byte) (ev ipc.Event, valid bool) {
	var fields map[string]json.RawMessage
	if json.Unmarshal(msg, &fields) != nil || fields == nil {
		return ev, false
	}
	typ, ok := fields["type"]
	if !ok || len(typ) == 0 || typ[0] != '"' || json.Unmarshal(typ, &ev.Type) != nil {
		return ev, false
	}
	ev.Data = fields["data"]
	return ev, true
}

// referenceEncode is EncodeEvent the slow way: the whole event as one struct through
// encoding/json.
func referenceEncode(t *testing.T, typ string, data any) []byte {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	err := enc.Encode(struct {
		Type string `json:"type"`
		Data any    `json:"data"`
	}{typ, data})
	if err != nil {
		t.Fatalf("encoding/json: %v", err)
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte{'\n'})
}
