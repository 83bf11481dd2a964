package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"strings"
	"time"
)

// hello plays an impostor on the pod network or on a member's node: it dials a sidecar's
// peer port in plaintext and replays the HELLO a member would send (docs/protocol.md,
// "Framing"), claiming that member's identity, then prints what the receiver answered:
// "refused: REASON" for a REFUSE frame, "welcome" for a WELCOME, "closed: ERR" otherwise.
//
//	testapp hello ADDR NAMESPACE NAME UID CHANNELS
func hello(ctx context.Context, args []string) error {
	addr, ns, name, uid, channels := args[0], args[1], args[2], args[3], strings.Split(args[4], ",")
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer func() { _ = conn.Close() }()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := conn.Write(helloFrame(ns, name, uid, channels)); err != nil {
		return err
	}
	fmt.Println(answer(bufio.NewReader(conn)))
	return nil
}

// Frame types of docs/protocol.md.
const (
	frameHello   = 1
	frameWelcome = 2
	frameRefuse  = 3
)

// helloFrame encodes HELLO: versions [1, 1], the claimed identity, incarnation 1 and the
// channels, behind the frame's uint32 length and type byte.
func helloFrame(ns, name, uid string, channels []string) []byte {
	body := []byte{frameHello}
	body = binary.BigEndian.AppendUint16(body, 1)
	body = binary.BigEndian.AppendUint16(body, 1)
	for _, s := range []string{ns, name, uid} {
		body = appendString(body, s)
	}
	body = binary.BigEndian.AppendUint64(body, 1)
	body = binary.AppendUvarint(body, uint64(len(channels)))
	for _, c := range channels {
		body = appendString(body, c)
	}
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(body))), body...)
}

func appendString(b []byte, s string) []byte {
	return append(binary.AppendUvarint(b, uint64(len(s))), s...)
}

// answer reads the receiver's first frame.
func answer(r *bufio.Reader) string {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return "closed: " + err.Error()
	}
	n := binary.BigEndian.Uint32(hdr[:4])
	if n == 0 || n > 1<<16 {
		return fmt.Sprintf("closed: frame of %d bytes", n)
	}
	body := make([]byte, n-1)
	if _, err := io.ReadFull(r, body); err != nil {
		return "closed: " + err.Error()
	}
	switch hdr[4] {
	case frameRefuse:
		l, k := binary.Uvarint(body)
		if k <= 0 || uint64(len(body)-k) < l {
			return "refused: (malformed reason)"
		}
		return "refused: " + string(body[k:k+int(l)])
	case frameWelcome:
		return "welcome"
	}
	return fmt.Sprintf("closed: frame type %d", hdr[4])
}
