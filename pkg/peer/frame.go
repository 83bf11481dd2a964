package peer

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/podipc/podipc/pkg/router"
)

// Protocol versions. A sidecar speaks every version from MinVersion to Version; the two
// ends of a link use the highest version both speak, so release N interoperates with
// N-1 as long as MinVersion trails Version by one.
const (
	Version    uint16 = 2
	MinVersion uint16 = 1
)

// VersionRun is the first version with RUN frames: a sender sends them only on a link
// whose negotiated version is at least this.
const VersionRun uint16 = 2

// FrameType is the first byte of every frame.
type FrameType uint8

// Frame types. Unknown types are skipped by the reader's user, so later versions may add
// frames that older ones ignore.
const (
	FrameHello    FrameType = 1 // sender → receiver: identity, incarnation, channels
	FrameWelcome  FrameType = 2 // receiver → sender: version, identity, resume point, presence
	FrameRefuse   FrameType = 3 // receiver → sender: why the link is refused
	FrameData     FrameType = 4 // sender → receiver: one sequenced message
	FrameAck      FrameType = 5 // receiver → sender: cumulative acknowledgement
	FramePresence FrameType = 6 // receiver → sender: local connection counts per channel
	FramePing     FrameType = 7 // both ways: keepalive when otherwise idle
	FrameGoodbye  FrameType = 8 // both ways: orderly end of the link
	FrameRun      FrameType = 9 // sender → receiver: consecutive sequenced messages (version 2)
)

// headerLen is the frame header: a 4-byte big-endian length of what follows (type byte
// plus body), then the type byte.
const headerLen = 5

// MaxFrameBytes bounds a frame: the largest message (16 MiB) plus its DATA header.
const MaxFrameBytes = 16<<20 + DataOverhead

// DataOverhead bounds what a DATA frame adds to its payload (type byte, sequence
// number, channel name, kind), with room to spare for fields of later versions: a
// link's frame bound is the largest maxMessageBytes of the channels it carries plus
// this.
const DataOverhead = 1024

// MaxRunBytes bounds a RUN frame's payload: a sender puts consecutive lines of one
// channel in one frame while they fit it, and a receiver's frame bound is never below it
// plus DataOverhead, whatever the channels' maxMessageBytes (a RUN's lines are checked
// against maxMessageBytes one by one). Small beside the receiver's 64 KiB read chunks:
// a frame that does not fit what is left of a chunk is carried over into the next one
// (copied), and one larger than a chunk gets a buffer of its own; with 64 KiB runs, every
// run did (1 KiB lines cost 15-20 % more CPU than with DATA frames, measured).
const MaxRunBytes = 8 << 10

// maxHandshakeBytes bounds HELLO and WELCOME, which are read before authentication.
const maxHandshakeBytes = 64 << 10

// Bounds of the strings in frames (docs/protocol.md, Bounds).
const (
	maxLabelBytes     = 63  // a channel name or a namespace: a DNS label
	maxSubdomainBytes = 253 // a pod name: a DNS subdomain
	maxUIDBytes       = 128 // a pod UID
	maxReasonBytes    = 1024
)

// ErrFrame reports a malformed frame; the link is closed. Every error a decoder returns
// is a *ProtocolError that matches it.
var ErrFrame = errors.New("peer: malformed frame")

// Protocol error reasons: the reason label of podipc_peer_protocol_errors_total.
const (
	ReasonMalformed   = "malformed"    // a short or undecodable field, or a string out of bounds
	ReasonChannelName = "channel_name" // a channel name that is not a DNS label
	ReasonKind        = "kind"         // a DATA kind this version does not know
	ReasonFrameSize   = "frame_size"   // a frame longer than the link's bound
	ReasonSequence    = "sequence"     // a DATA sequence number after a gap
	ReasonAck         = "ack"          // an ACK beyond the highest sequence number sent
	ReasonLastSeq     = "last_seq"     // a WELCOME lastSeq beyond the highest sequence number sent
	ReasonRun         = "run"          // a RUN frame whose lines do not match its count
)

// ProtocolError is a frame that breaks the protocol: the link that carried it ends,
// and Reason labels podipc_peer_protocol_errors_total. It matches ErrFrame.
type ProtocolError struct {
	Reason string
	Detail string
}

func (e *ProtocolError) Error() string {
	return "peer: protocol error (" + e.Reason + "): " + e.Detail
}

// Is makes every protocol error match ErrFrame.
func (e *ProtocolError) Is(target error) bool { return target == ErrFrame }

func protocolError(reason, format string, args ...any) error {
	return &ProtocolError{Reason: reason, Detail: fmt.Sprintf(format, args...)}
}

// ValidLabel reports whether b is a DNS label (RFC 1123: at most 63 lower case
// letters, digits and '-', starting and ending with a letter or digit), the form of
// every channel name. It allocates nothing: the receiver checks every DATA frame.
func ValidLabel(b []byte) bool {
	if len(b) == 0 || len(b) > maxLabelBytes {
		return false
	}
	for i, c := range b {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case c == '-' && i > 0 && i < len(b)-1:
		default:
			return false
		}
	}
	return true
}

// validSubdomain reports whether s is a DNS subdomain (dot-separated DNS labels, at
// most 253 bytes), the form of a pod name.
func validSubdomain(s []byte) bool {
	if len(s) == 0 || len(s) > maxSubdomainBytes {
		return false
	}
	for part := range strings.SplitSeq(string(s), ".") {
		if !ValidLabel([]byte(part)) {
			return false
		}
	}
	return true
}

// validUID reports whether s can be a pod UID: 1 to 128 letters, digits, '-', '_', '.'.
func validUID(s []byte) bool {
	if len(s) == 0 || len(s) > maxUIDBytes {
		return false
	}
	for _, c := range s {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == '.':
		default:
			return false
		}
	}
	return true
}

// Identity names one incarnation of a sidecar: its pod and a random number chosen at
// process start, which changes whenever the sidecar restarts.
type Identity struct {
	Namespace, Name, UID string
	Incarnation          uint64
}

// Hello opens a link.
type Hello struct {
	MinVersion, MaxVersion uint16
	Pod                    Identity
	Channels               []string
}

// Welcome accepts a link. Known says the receiver remembers the sender's incarnation;
// LastSeq is then the last sequence number it received from it (the sender resumes
// after it).
type Welcome struct {
	Version  uint16
	Pod      Identity
	Known    bool
	LastSeq  uint64
	Presence map[string]int
}

// Data is one message.
type Data struct {
	Seq uint64
	// Channel aliases the frame body; look it up without converting (no allocation).
	Channel []byte
	Kind    router.Kind
	Payload []byte
}

// Run is consecutive messages of one channel and kind, numbered Seq, Seq+1, …,
// Seq+Count-1: a RUN frame. Payload holds them each ended by its kind's delimiter
// (router.Kind.Delimiter), exactly as an app connection of that kind frames them, so
// that neither end parses a line it only carries.
type Run struct {
	Seq   uint64
	Count int
	// Channel aliases the frame body, as in Data.
	Channel []byte
	Kind    router.Kind
	Payload []byte
}

// Last returns the sequence number of the run's last message.
func (r Run) Last() uint64 { return r.Seq + uint64(r.Count) - 1 }

// appendHeader appends a frame header for a body of n bytes.
func appendHeader(dst []byte, t FrameType, n int) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(n+1))
	return append(dst, byte(t))
}

func appendString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

func appendIdentity(dst []byte, id Identity) []byte {
	dst = appendString(dst, id.Namespace)
	dst = appendString(dst, id.Name)
	dst = appendString(dst, id.UID)
	return binary.BigEndian.AppendUint64(dst, id.Incarnation)
}

// frame wraps body (built after a placeholder header) into a frame.
func frame(t FrameType, body func([]byte) []byte) []byte {
	b := body(make([]byte, headerLen, 128))
	binary.BigEndian.PutUint32(b, uint32(len(b)-headerLen+1))
	b[4] = byte(t)
	return b
}

// Frame returns h as a frame.
func (h Hello) Frame() []byte {
	return frame(FrameHello, func(b []byte) []byte {
		b = binary.BigEndian.AppendUint16(b, h.MinVersion)
		b = binary.BigEndian.AppendUint16(b, h.MaxVersion)
		b = appendIdentity(b, h.Pod)
		b = binary.AppendUvarint(b, uint64(len(h.Channels)))
		for _, c := range h.Channels {
			b = appendString(b, c)
		}
		return b
	})
}

// Frame returns w as a frame.
func (w Welcome) Frame() []byte {
	return frame(FrameWelcome, func(b []byte) []byte {
		b = binary.BigEndian.AppendUint16(b, w.Version)
		b = appendIdentity(b, w.Pod)
		known := byte(0)
		if w.Known {
			known = 1
		}
		b = append(b, known)
		b = binary.BigEndian.AppendUint64(b, w.LastSeq)
		return appendPresence(b, w.Presence)
	})
}

func appendPresence(b []byte, p map[string]int) []byte {
	names := make([]string, 0, len(p))
	for n := range p {
		names = append(names, n)
	}
	slices.Sort(names)
	b = binary.AppendUvarint(b, uint64(len(names)))
	for _, n := range names {
		b = appendString(b, n)
		b = binary.AppendUvarint(b, uint64(max(p[n], 0)))
	}
	return b
}

// PresenceFrame returns a PRESENCE frame.
func PresenceFrame(p map[string]int) []byte {
	return frame(FramePresence, func(b []byte) []byte { return appendPresence(b, p) })
}

// ReasonFrame returns a REFUSE or GOODBYE frame. A reason is cut to its bound.
func ReasonFrame(t FrameType, reason string) []byte {
	if len(reason) > maxReasonBytes {
		reason = strings.ToValidUTF8(reason[:maxReasonBytes], "")
	}
	return frame(t, func(b []byte) []byte { return appendString(b, reason) })
}

// AckFrame appends an ACK frame to dst.
func AckFrame(dst []byte, seq uint64) []byte {
	var body [binary.MaxVarintLen64]byte
	n := binary.PutUvarint(body[:], seq)
	dst = appendHeader(dst, FrameAck, n)
	return append(dst, body[:n]...)
}

// PingFrame returns a PING frame.
func PingFrame() []byte { return appendHeader(nil, FramePing, 0) }

// AppendDataHeader appends the header of a DATA frame whose payload follows it, so a
// writer can copy the payload straight from its queue without building the frame.
func AppendDataHeader(dst []byte, seq uint64, channel string, kind router.Kind, payloadLen int) []byte {
	var tmp [2*binary.MaxVarintLen64 + 1]byte
	b := binary.AppendUvarint(tmp[:0], seq)
	b = binary.AppendUvarint(b, uint64(len(channel)))
	n := len(b) + len(channel) + 1 + payloadLen
	dst = appendHeader(dst, FrameData, n)
	dst = append(dst, b...)
	dst = append(dst, channel...)
	return append(dst, byte(kind))
}

// appendData appends a whole DATA frame to dst: the frame header, seq, tail (the
// channel name and kind as chanState encodes them once) and payload. It is the
// sending sidecar's per-line and per-link work, so it grows dst once and writes the
// fields in place rather than appending them one by one (AppendDataHeader's output,
// with the payload after it; TestAppendDataMatchesHeader).
func appendData(dst []byte, seq uint64, tail, payload []byte) []byte {
	var hdr [headerLen + binary.MaxVarintLen64]byte
	i := headerLen
	for ; seq >= 0x80; seq >>= 7 {
		hdr[i] = byte(seq) | 0x80
		i++
	}
	hdr[i] = byte(seq)
	i++
	binary.BigEndian.PutUint32(hdr[:], uint32(i-headerLen+len(tail)+len(payload)+1))
	hdr[4] = byte(FrameData)
	dst = append(dst, hdr[:i]...)
	dst = append(dst, tail...)
	return append(dst, payload...)
}

// appendRun appends a whole RUN frame to dst: the frame header, the first message's
// sequence number, the count, tail (as appendData) and payload, count messages each
// ended by the kind's delimiter.
func appendRun(dst []byte, seq uint64, count int, tail, payload []byte) []byte {
	var hdr [headerLen + 2*binary.MaxVarintLen64]byte
	b := binary.AppendUvarint(hdr[:headerLen], seq)
	b = binary.AppendUvarint(b, uint64(count))
	binary.BigEndian.PutUint32(b, uint32(len(b)-headerLen+len(tail)+len(payload)+1))
	b[4] = byte(FrameRun)
	dst = append(dst, b...)
	dst = append(dst, tail...)
	return append(dst, payload...)
}

// decoder reads fields from a frame body, remembering the first error.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail(what string) { d.failWith(ReasonMalformed, "short "+what) }

func (d *decoder) failWith(reason, detail string) {
	if d.err == nil {
		d.err = &ProtocolError{Reason: reason, Detail: detail}
	}
	d.b = nil
}

// take returns the next n bytes, or nil (recording a short frame) if fewer are left.
func (d *decoder) take(n uint64, what string) []byte {
	if n > uint64(len(d.b)) {
		d.fail(what)
		return nil
	}
	v := d.b[:n:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) u16() uint16 {
	if v := d.take(2, "u16"); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

func (d *decoder) u64() uint64 {
	if v := d.take(8, "u64"); v != nil {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

func (d *decoder) byte() byte {
	if v := d.take(1, "byte"); v != nil {
		return v[0]
	}
	return 0
}

func (d *decoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail("varint")
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) bytes() []byte {
	n := d.uvarint()
	if d.err != nil {
		return nil
	}
	return d.take(n, "string")
}

// checked returns the next string if valid says it is well formed, recording what is
// wrong with it (reason, what) otherwise.
func (d *decoder) checked(valid func([]byte) bool, reason, what string) string {
	b := d.bytes()
	if d.err != nil {
		return ""
	}
	if !valid(b) {
		d.failWith(reason, fmt.Sprintf("invalid %s %q", what, b[:min(len(b), 80)]))
		return ""
	}
	return string(b)
}

// channel reads a channel name: a DNS label.
func (d *decoder) channel() string { return d.checked(ValidLabel, ReasonChannelName, "channel name") }

// reason reads a REFUSE or GOODBYE reason: valid UTF-8 of at most 1 KiB, since it is
// logged.
func (d *decoder) reason() string {
	return d.checked(func(b []byte) bool { return len(b) <= maxReasonBytes && utf8.Valid(b) }, ReasonMalformed, "reason")
}

func (d *decoder) identity() Identity {
	return Identity{
		Namespace:   d.checked(ValidLabel, ReasonMalformed, "namespace"),
		Name:        d.checked(validSubdomain, ReasonMalformed, "pod name"),
		UID:         d.checked(validUID, ReasonMalformed, "pod UID"),
		Incarnation: d.u64(),
	}
}

// count reads a list length, bounded by the bytes left (each entry takes at least one).
func (d *decoder) count() int {
	n := d.uvarint()
	if n > uint64(len(d.b)) {
		d.fail("list")
		return 0
	}
	return int(n)
}

func (d *decoder) presence() map[string]int {
	n := d.count()
	p := make(map[string]int, n)
	for range n {
		name := d.channel()
		c := d.uvarint()
		if d.err != nil {
			return nil
		}
		p[name] = int(min(c, 1<<31))
	}
	return p
}

// ParseHello decodes a HELLO body. Trailing bytes are ignored (later versions may add
// fields).
func ParseHello(b []byte) (Hello, error) {
	d := decoder{b: b}
	h := Hello{MinVersion: d.u16(), MaxVersion: d.u16(), Pod: d.identity()}
	n := d.count()
	for range n {
		h.Channels = append(h.Channels, d.channel())
	}
	if d.err != nil {
		return Hello{}, d.err
	}
	return h, nil
}

// ParseWelcome decodes a WELCOME body.
func ParseWelcome(b []byte) (Welcome, error) {
	d := decoder{b: b}
	w := Welcome{Version: d.u16(), Pod: d.identity()}
	switch d.byte() {
	case 0:
	case 1:
		w.Known = true
	default:
		d.failWith(ReasonMalformed, "known is neither 0 nor 1")
	}
	w.LastSeq = d.u64()
	w.Presence = d.presence()
	if d.err != nil {
		return Welcome{}, d.err
	}
	return w, nil
}

// ParsePresence decodes a PRESENCE body.
func ParsePresence(b []byte) (map[string]int, error) {
	d := decoder{b: b}
	p := d.presence()
	return p, d.err
}

// ParseReason decodes a REFUSE or GOODBYE body.
func ParseReason(b []byte) (string, error) {
	d := decoder{b: b}
	s := d.reason()
	return s, d.err
}

// ParseAck decodes an ACK body.
func ParseAck(b []byte) (uint64, error) {
	d := decoder{b: b}
	v := d.uvarint()
	return v, d.err
}

// ParseData decodes a DATA body and validates its framing and kind. The channel name is
// not checked here: the receiver looks it up among the channels the link shares, and a
// name found there is a DNS label by construction, so only a name that misses is
// checked (CheckChannel), which keeps ValidLabel off the per-line path. Payload aliases
// b; its size is checked against the channel's maxMessageBytes by the receiver, which
// knows the channel. It is the receiving sidecar's per-line work, so it reads the
// fields directly rather than through a decoder, and allocates only for an error.
func ParseData(b []byte) (Data, error) {
	seq, n := binary.Uvarint(b)
	if n <= 0 {
		return Data{}, protocolError(ReasonMalformed, "short varint")
	}
	name, kind, payload, err := parseTail(b[n:])
	if err != nil {
		return Data{}, err
	}
	return Data{Seq: seq, Channel: name, Kind: kind, Payload: payload}, nil
}

// parseTail decodes what DATA and RUN frames end with: the channel name, the kind and
// the payload (the rest of the body, aliased).
func parseTail(b []byte) (channel []byte, kind router.Kind, payload []byte, err error) {
	l, n := binary.Uvarint(b)
	if n <= 0 {
		return nil, 0, nil, protocolError(ReasonMalformed, "short varint")
	}
	b = b[n:]
	if l >= uint64(len(b)) { // the channel name and the kind byte
		return nil, 0, nil, protocolError(ReasonMalformed, "short string")
	}
	k := b[l]
	if k > byte(router.NodeIPC) {
		return nil, 0, nil, protocolError(ReasonKind, "kind %d", k)
	}
	return b[:l:l], router.Kind(k), b[l+1:], nil
}

// ParseRun decodes a RUN body and validates its framing, kind and count: at least one
// message, sequence numbers that do not wrap, and a payload that ends with the kind's
// delimiter and holds exactly count of them, so that every message the receiver splits
// off is one the sender framed (a line that smuggles a line break into another cannot
// pass). The channel and the messages' sizes are checked by the receiver, as for DATA.
// The count costs one vectorised pass over the payload; nothing is allocated but an
// error.
func ParseRun(b []byte) (Run, error) {
	seq, n := binary.Uvarint(b)
	if n <= 0 {
		return Run{}, protocolError(ReasonMalformed, "short varint")
	}
	b = b[n:]
	count, n := binary.Uvarint(b)
	if n <= 0 {
		return Run{}, protocolError(ReasonMalformed, "short varint")
	}
	name, kind, payload, err := parseTail(b[n:])
	if err != nil {
		return Run{}, err
	}
	switch {
	case count == 0 || count > uint64(len(payload)):
		return Run{}, protocolError(ReasonRun, "%d messages in %d bytes", count, len(payload))
	case seq+count-1 < seq:
		return Run{}, protocolError(ReasonRun, "sequence numbers %d + %d wrap", seq, count)
	case payload[len(payload)-1] != kind.Delimiter():
		return Run{}, protocolError(ReasonRun, "the last message is not ended by its delimiter")
	}
	if got := bytes.Count(payload, []byte{kind.Delimiter()}); uint64(got) != count {
		return Run{}, protocolError(ReasonRun, "%d messages declared, %d delimited", count, got)
	}
	return Run{Seq: seq, Count: int(count), Channel: name, Kind: kind, Payload: payload}, nil
}

// CheckChannel returns a protocol error (ReasonChannelName) if name, a DATA frame's
// channel, is not a DNS label. The receiver calls it for a name that is not one of the
// link's shared channels, before counting the line as not shared.
func CheckChannel(name []byte) error {
	if ValidLabel(name) {
		return nil
	}
	return protocolError(ReasonChannelName, "invalid channel name %q", name[:min(len(name), 80)])
}
