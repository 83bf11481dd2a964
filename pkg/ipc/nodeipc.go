package ipc

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
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
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	err := enc.Encode(struct {
		Type string `json:"type"`
		Data any    `json:"data"`
	}{typ, data})
	if err != nil {
		return nil, fmt.Errorf("ipc: encode node-ipc event %q: %w", typ, err)
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte{'\n'}), nil
}

// DecodeEvent parses a node-ipc message (without its delimiter). It fails, with an
// error wrapping ErrMalformed, unless msg is a JSON object with a string "type". Keys
// match exactly and the last duplicate wins, as with JavaScript's JSON.parse.
func DecodeEvent(msg []byte) (Event, error) {
	if !validEvent(msg) {
		return Event{}, malformed(msg)
	}
	// A map, not a struct: encoding/json matches struct fields case-insensitively,
	// which JSON.parse does not.
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(msg, &fields); err != nil {
		return Event{}, errors.Join(malformed(msg), err)
	}
	var ev Event
	if err := json.Unmarshal(fields["type"], &ev.Type); err != nil {
		return Event{}, errors.Join(malformed(msg), err)
	}
	ev.Data = fields["data"]
	return ev, nil
}

// validEvent reports whether b is a JSON object whose (last) "type" member is a string.
// It allocates nothing for ordinary frames, so the NodeIPC Reader stays cheap.
func validEvent(b []byte) bool {
	if !json.Valid(b) {
		return false
	}
	// b is valid JSON from here on, so the walk below only has to find the top-level
	// members; the bounds checks guard against a bug, not against input.
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return false
	}
	typed := false
	i = skipSpace(b, i+1)
	for i < len(b) && b[i] == '"' {
		keyEnd := skipString(b, i)
		isType := isTypeKey(b[i:keyEnd])
		i = skipSpace(b, keyEnd)
		if i >= len(b) || b[i] != ':' {
			return false
		}
		i = skipSpace(b, i+1)
		if i >= len(b) {
			return false
		}
		if isType {
			typed = b[i] == '"'
		}
		i = skipSpace(b, skipValue(b, i))
		if i < len(b) && b[i] == ',' {
			i = skipSpace(b, i+1)
		}
	}
	return typed
}

// isTypeKey reports whether the quoted JSON string key decodes to "type". Escaped keys
// ("\u0074ype") are rare enough to decode the slow way.
func isTypeKey(key []byte) bool {
	if string(key) == `"type"` {
		return true
	}
	if bytes.IndexByte(key, '\\') < 0 {
		return false
	}
	var s string
	return json.Unmarshal(key, &s) == nil && s == "type"
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// skipString returns the index just past the JSON string starting at b[i] == '"'.
func skipString(b []byte, i int) int {
	for i++; i < len(b); i++ {
		switch b[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return len(b)
}

// skipValue returns the index just past the JSON value starting at b[i].
func skipValue(b []byte, i int) int {
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for i < len(b) {
			switch b[i] {
			case '"':
				i = skipString(b, i)
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1
				}
			}
			i++
		}
		return len(b)
	}
	// A number, true, false or null runs to the next delimiter.
	for i < len(b) && b[i] != ',' && b[i] != '}' && b[i] != ']' && b[i] != ' ' &&
		b[i] != '\t' && b[i] != '\n' && b[i] != '\r' {
		i++
	}
	return i
}
