package ipc

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"unicode/utf8"
)

// node-ipc's defaults: a client of id "orders" connects to /tmp/app.orders.
const (
	// DefaultSocketRoot is node-ipc's default ipc.config.socketRoot.
	DefaultSocketRoot = "/tmp/"
	// DefaultAppspace is node-ipc's default ipc.config.appspace.
	DefaultAppspace = "app."
)

// SocketPath returns the Unix socket path node-ipc uses for id: socketRoot + appspace +
// id, concatenated exactly as node-ipc does (so socketRoot should end with '/'). An empty
// socketRoot or appspace means node-ipc's default.
func SocketPath(socketRoot, appspace, id string) string {
	if socketRoot == "" {
		socketRoot = DefaultSocketRoot
	}
	if appspace == "" {
		appspace = DefaultAppspace
	}
	return socketRoot + appspace + id
}

// Event is one node-ipc message: what ipc.server.emit(socket, type, data) sends.
type Event struct {
	// Type is the event name node-ipc dispatches on.
	Type string
	// Data is the payload as JSON text; nil when the sender sent none (node-ipc omits
	// data that is undefined).
	Data json.RawMessage
}

// EncodeEvent returns the compact JSON text {"type":…,"data":…} of an event, without
// the '\f' delimiter (the NodeIPC Writer adds it). data is marshalled with
// encoding/json; a json.RawMessage is embedded as is. HTML characters are not escaped,
// so the text matches what node's JSON.stringify produces.
func EncodeEvent(typ string, data any) ([]byte, error) {
	// Room for the usual small event, so the buffer is allocated once.
	buf := bytes.NewBuffer(make([]byte, 0, 128+len(typ)))
	enc := json.NewEncoder(buf)
	enc.SetEscapeHTML(false)
	buf.WriteString(`{"type":`)
	if plainASCII(typ) {
		// What encoding/json writes for such a string, without boxing it in an any.
		buf.WriteByte('"')
		buf.WriteString(typ)
		buf.WriteByte('"')
	} else {
		if err := enc.Encode(typ); err != nil {
			return nil, fmt.Errorf("ipc: encode node-ipc event %q: %w", typ, err)
		}
		buf.Truncate(buf.Len() - 1) // Encode's '\n'
	}
	buf.WriteString(`,"data":`)
	if err := enc.Encode(data); err != nil {
		return nil, fmt.Errorf("ipc: encode node-ipc event %q: %w", typ, err)
	}
	b := buf.Bytes()
	b[len(b)-1] = '}' // in place of Encode's '\n'
	return b, nil
}

// plainASCII reports whether s is printable ASCII without '"' or '\\': the strings
// encoding/json quotes without escaping anything.
func plainASCII(s string) bool {
	for i := range len(s) {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' {
			return false
		}
	}
	return true
}

// DecodeEvent parses a node-ipc message (without its delimiter). It fails, with an
// error wrapping ErrMalformed, unless msg is a JSON object with a string "type". Keys
// match exactly and the last duplicate wins, as with JavaScript's JSON.parse. The
// returned Data is a copy: it does not alias msg.
func DecodeEvent(msg []byte) (Event, error) {
	sp, ok := scanEvent(msg)
	if !ok {
		return Event{}, malformed(msg)
	}
	var ev Event
	typ := msg[sp.typ[0]:sp.typ[1]]
	if raw := typ[1 : len(typ)-1]; bytes.IndexByte(raw, '\\') < 0 && utf8.Valid(raw) {
		// Nothing to unescape or replace: the text between the quotes is the string.
		ev.Type = string(raw)
	} else {
		// A separate variable, so that ev does not escape to the heap.
		var s string
		if err := json.Unmarshal(typ, &s); err != nil {
			// Unreachable: scanEvent accepted the string.
			return Event{}, errors.Join(malformed(msg), err)
		}
		ev.Type = s
	}
	if sp.data[0] >= 0 {
		ev.Data = bytes.Clone(msg[sp.data[0]:sp.data[1]])
	}
	return ev, nil
}

// validEvent reports whether b is a JSON object whose (last) "type" member is a string.
// It allocates nothing for ordinary frames, so the NodeIPC Reader and Writer stay cheap.
func validEvent[T string | []byte](b T) bool {
	_, ok := scanEvent(b)
	return ok
}

// eventSpans locates the top-level members of a node-ipc event that DecodeEvent needs:
// each is the [start, end) of the member's JSON value text, or {-1, -1} when absent.
type eventSpans struct {
	typ, data [2]int
}

// maxNestingDepth is encoding/json's limit on nested arrays and objects; deeper text is
// invalid to json.Valid and json.Unmarshal, so it is invalid here too.
const maxNestingDepth = 10000

// inlineNesting is how many levels of nesting scanNested tracks in an array on its own
// stack frame; deeper documents grow the stack on the heap.
const inlineNesting = 64

// scanEvent validates b as JSON exactly as json.Valid does, in one pass and without
// allocating (below inlineNesting levels of nesting), and finds the last "type" and "data" members
// of its top-level object. ok is false unless b is valid JSON, an object, and its "type"
// is a string.
func scanEvent[T string | []byte](b T) (sp eventSpans, ok bool) {
	sp = eventSpans{typ: [2]int{-1, -1}, data: [2]int{-1, -1}}
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return sp, false
	}
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == '}' {
		return sp, false // valid, but without a "type"
	}
	for {
		keyStart := i
		if i, ok = scanKey(b, i); !ok {
			return sp, false
		}
		key := b[keyStart:i]
		if i, ok = scanColon(b, i); !ok {
			return sp, false
		}
		valStart := i
		if i, ok = scanValue(b, i, 1); !ok {
			return sp, false
		}
		switch {
		case isKey(key, "type"):
			sp.typ = [2]int{valStart, i}
		case isKey(key, "data"):
			sp.data = [2]int{valStart, i}
		}
		if i = skipSpace(b, i); i >= len(b) {
			return sp, false
		}
		if b[i] == '}' {
			break
		}
		if b[i] != ',' {
			return sp, false
		}
		i = skipSpace(b, i+1)
	}
	if skipSpace(b, i+1) != len(b) {
		return sp, false
	}
	return sp, sp.typ[0] >= 0 && b[sp.typ[0]] == '"'
}

// isKey reports whether the quoted JSON string key decodes to name. Escaped keys
// ("\u0074ype") are rare enough to decode the slow way.
func isKey[T string | []byte](key T, name string) bool {
	if len(key) == len(name)+2 && string(key[1:len(key)-1]) == name {
		return true
	}
	for j := range len(key) {
		if key[j] == '\\' {
			var s string
			return json.Unmarshal([]byte(key), &s) == nil && s == name
		}
	}
	return false
}

// scanKey returns the index just past the object key (a JSON string) at b[i].
func scanKey[T string | []byte](b T, i int) (int, bool) {
	if i >= len(b) || b[i] != '"' {
		return i, false
	}
	return scanString(b, i)
}

// scanColon skips the ':' after an object key and the space around it, and returns the
// index of the member's value, which is within b.
func scanColon[T string | []byte](b T, i int) (int, bool) {
	i = skipSpace(b, i)
	if i >= len(b) || b[i] != ':' {
		return i, false
	}
	i = skipSpace(b, i+1)
	return i, i < len(b)
}

func skipSpace[T string | []byte](b T, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// scanValue returns the index just past the JSON value starting at b[i] (i < len(b)),
// which sits inside depth levels of arrays and objects.
func scanValue[T string | []byte](b T, i, depth int) (int, bool) {
	switch b[i] {
	case '{', '[':
		return scanNested(b, i, depth)
	case '"':
		return scanString(b, i)
	case 't':
		return scanLiteral(b, i, "true")
	case 'f':
		return scanLiteral(b, i, "false")
	case 'n':
		return scanLiteral(b, i, "null")
	}
	return scanNumber(b, i)
}

// scanNested returns the index just past the array or object starting at b[i], which
// sits inside depth levels. It walks the nesting with an explicit stack rather than
// recursion, so hostile nesting costs no goroutine stack.
func scanNested[T string | []byte](b T, i, depth int) (int, bool) {
	// objects[k] says whether the container k+1 levels in is an object; the array
	// keeps ordinary nesting off the heap.
	var stack [inlineNesting]bool
	objects := stack[:0]
	var ok bool
	for {
		// b[i] starts a value (i < len(b)).
		if c := b[i]; c == '{' || c == '[' {
			if depth+len(objects) >= maxNestingDepth {
				return i, false
			}
			objects = append(objects, c == '{')
			if i = skipSpace(b, i+1); i >= len(b) {
				return i, false
			}
			if b[i] != c+2 { // '{'+2 is '}', '['+2 is ']'
				if c == '{' {
					if i, ok = scanKey(b, i); ok {
						i, ok = scanColon(b, i)
					}
					if !ok {
						return i, false
					}
				}
				continue
			}
			i++
			objects = objects[:len(objects)-1]
		} else if i, ok = scanValue(b, i, 0); !ok {
			return i, false
		}
		// A value ends at i. Close every container that ends here, then move to the
		// next member of the innermost one still open.
		for {
			if len(objects) == 0 {
				return i, true
			}
			if i = skipSpace(b, i); i >= len(b) {
				return i, false
			}
			object := objects[len(objects)-1]
			if b[i] == ',' {
				i = skipSpace(b, i+1)
				if object {
					if i, ok = scanKey(b, i); ok {
						i, ok = scanColon(b, i)
					}
					if !ok {
						return i, false
					}
				}
				if i >= len(b) {
					return i, false
				}
				break
			}
			if (object && b[i] != '}') || (!object && b[i] != ']') {
				return i, false
			}
			i++
			objects = objects[:len(objects)-1]
		}
	}
}

// scanString returns the index just past the JSON string starting at b[i] == '"'. Like
// encoding/json it rejects control characters and bad escapes but not invalid UTF-8.
func scanString[T string | []byte](b T, i int) (int, bool) {
	for i++; i < len(b); i++ {
		if i = skipPlain(b, i); i >= len(b) {
			break
		}
		switch c := b[i]; {
		case c == '"':
			return i + 1, true
		case c == '\\':
			i++
			if i >= len(b) {
				return i, false
			}
			switch b[i] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if i+4 >= len(b) || !isHex(b[i+1]) || !isHex(b[i+2]) || !isHex(b[i+3]) || !isHex(b[i+4]) {
					return i, false
				}
				i += 4
			default:
				return i, false
			}
		case c < 0x20:
			return i, false
		}
	}
	return i, false
}

// skipPlain returns the index of the first byte from b[i] on that does not stand for
// itself inside a JSON string. Most of a frame is such plain bytes, so it tests eight
// at a time (SWAR) before going byte by byte.
func skipPlain[T string | []byte](b T, i int) int {
	const (
		ones  = 0x0101010101010101
		highs = 0x8080808080808080
	)
	for ; i+8 <= len(b); i += 8 {
		x := uint64(b[i]) | uint64(b[i+1])<<8 | uint64(b[i+2])<<16 | uint64(b[i+3])<<24 |
			uint64(b[i+4])<<32 | uint64(b[i+5])<<40 | uint64(b[i+6])<<48 | uint64(b[i+7])<<56
		// A byte's high bit is set in special if the byte is below 0x20, '"' or '\\'
		// (the classic "has less than" and "has zero byte" tests); bytes from 0x80
		// up are plain and masked out by ^x.
		special := (x - 0x20*ones) | ((x ^ '"'*ones) - ones) | ((x ^ '\\'*ones) - ones)
		if special&^x&highs != 0 {
			break
		}
	}
	for i < len(b) && plain[b[i]] {
		i++
	}
	return i
}

// plain[c] says whether byte c stands for itself inside a JSON string: not a quote, a
// backslash or a control character.
var plain = func() (t [256]bool) {
	for c := 0x20; c < 256; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

func isHex(c byte) bool {
	return ('0' <= c && c <= '9') || ('a' <= c && c <= 'f') || ('A' <= c && c <= 'F')
}

// scanLiteral returns the index just past lit (true, false or null) at b[i].
func scanLiteral[T string | []byte](b T, i int, lit string) (int, bool) {
	if len(b)-i < len(lit) {
		return i, false
	}
	for j := 1; j < len(lit); j++ {
		if b[i+j] != lit[j] {
			return i, false
		}
	}
	return i + len(lit), true
}

// scanNumber returns the index just past the JSON number at b[i]: -?(0|[1-9][0-9]*)
// (\.[0-9]+)?([eE][+-]?[0-9]+)?. What follows it is the caller's to check.
func scanNumber[T string | []byte](b T, i int) (int, bool) {
	if b[i] == '-' {
		if i++; i >= len(b) {
			return i, false
		}
	}
	switch {
	case b[i] == '0':
		i++
	case '1' <= b[i] && b[i] <= '9':
		i = skipDigits(b, i+1)
	default:
		return i, false
	}
	if i < len(b) && b[i] == '.' {
		j := skipDigits(b, i+1)
		if j == i+1 {
			return j, false
		}
		i = j
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		j := skipDigits(b, i)
		if j == i {
			return j, false
		}
		i = j
	}
	return i, true
}

func skipDigits[T string | []byte](b T, i int) int {
	for i < len(b) && '0' <= b[i] && b[i] <= '9' {
		i++
	}
	return i
}
