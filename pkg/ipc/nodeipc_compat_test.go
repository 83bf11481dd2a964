package ipc_test

// Compatibility with the real node-ipc npm packages (docs/design.md §10, README "From Node.js"): node-ipc 9.2.1, 10.1.0
// (its CommonJS bundle, node-ipc.cjs, is what require() resolves through "exports") and
// @achrinza/node-ipc 10.1.11, each in both directions (Go server with a node-ipc client, a
// node-ipc server with a Go client), over a Unix socket and TCP, in JSON event mode and in
// rawBuffer mode. hack/nodeipc/peer.cjs is the node-ipc side.
//
// The wire format, read from the installed packages (entities/EventParser.js, js-message,
// dao/socketServer.js, dao/client.js; identical in all three), and what surprised us:
//
//   - A frame is JSON.stringify({type, data}) followed by config.delimiter ("\f"): "type"
//     first, then "data", nothing else. No id, socketRoot or handshake is ever sent; id and
//     socketRoot only name the Unix socket, as the plain concatenation socketRoot + appspace
//     + id (no separator is added), which ipc.SocketPath must reproduce.
//   - The sender replaces falsy data other than false and 0 (null, "", undefined, NaN) with
//     {}, and any data carrying a "_maxListeners" key with {}. So a node-ipc emit of null
//     arrives as {"type":…,"data":{}}; null sent by Go reaches a node-ipc handler as null.
//   - The receiver decodes bytes as config.encoding (utf8) strings and only splits frames
//     when a read ends exactly on the delimiter; otherwise it keeps appending to a buffer.
//     There is no size limit at all on the node side, so an event larger than pkg/ipc's
//     64 KiB default is accepted by node-ipc and ends the Go socket unless
//     WithMaxMessageBytes is raised (this test uses 1 MiB for its ~100 KiB event).
//   - A frame that is not JSON becomes a node-ipc "error" event. In 10.x a frame whose
//     "type" is not a string throws inside event-pubsub 5 and kills the node process.
//   - rawBuffer mode: emit(x) writes Buffer.from(x, encoding) — its first argument, not
//     data — with no delimiter, and the receiver gets "data" events of arbitrary chunks.
//     Because the socket still decodes with setEncoding(encoding), raw mode with the
//     default 'utf8' is not binary safe (invalid UTF-8 turns into U+FFFD); with 'hex' it is.
//   - serveNet treats port 0 as unset and listens on 8000, so peer.cjs picks a free port.
//   - node-ipc 9.2.1's event-pubsub 4 picks its ES5 build on Node >= 10 (it compares one
//     digit of process.version), whose "*" catch-all throws on primitive data, so peer.cjs
//     subscribes to each event type by name.
//   - JSON.stringify escapes only '"', '\\' and control characters (\f as "\f"); it leaves
//     non-ASCII, U+2028 and '<', '>', '&' raw and writes a lone surrogate as "\udxxx".
//     Go's encoding/json escapes '<', '>', '&' and U+2028; each side parses the other.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/podipc/podipc/pkg/ipc"
)

// compatWait bounds every wait on the other process; generous for a loaded 2-core machine.
const compatWait = 60 * time.Second

// compatCase is one event exchanged in both directions.
type compatCase struct {
	Type string
	// Data is JSON text exactly as JavaScript's JSON.stringify writes it, so node-ipc's
	// frames can be compared byte for byte.
	Data string
	// FromNode, when set, is the data node-ipc writes instead of Data (its falsy rule).
	FromNode string
}

func compatCases() []compatCase {
	big := strings.Repeat("0123456789abcdef", 100*1024/16) // 100 KiB, over the 64 KiB default
	cases := []compatCase{
		{Type: "message", Data: `"hello"`},
		{Type: "number", Data: `42`},
		{Type: "number", Data: `-3.25`},
		{Type: "number", Data: `0`},
		{Type: "number", Data: `9007199254740991`},
		{Type: "bool", Data: `true`},
		{Type: "bool", Data: `false`},
		{Type: "object", Data: `{"a":{"b":[1,"two",{"c":null}]},"id":"x","e":{}}`},
		{Type: "array", Data: `[1,"a",null,[],{},[true,false]]`},
		{Type: "null", Data: `null`, FromNode: `{}`},
		{Type: "empty", Data: `""`, FromNode: `{}`},
		{Type: "big", Data: `"` + big + `"`},
		{Type: "escapes", Data: `"form\ffeed\nnewline\r\ttab \"quoted\" back\\slash \f"`},
		{Type: "unicode", Data: "\"héllo wörld — 日本語 🎉👩‍👩‍👧 \u2028 <a href='x'>&amp;</a>\""},
		{Type: "surrogate", Data: `"\ud83d"`},
		{Type: "événement 🎉", Data: `{"k":"v"}`},
	}
	// Enough small events to span many reads, so order across read boundaries is checked.
	for i := range 300 {
		cases = append(cases, compatCase{Type: "seq", Data: fmt.Sprintf(`{"i":%d}`, i)})
	}
	return cases
}

// rawMode is a node-ipc rawBuffer configuration and the bytes exchanged in it.
type rawMode struct {
	encoding string
	chunks   [][]byte // what node-ipc emits, one emit per chunk
}

func rawModes() map[string]rawMode {
	text := [][]byte{
		[]byte("hello "),
		[]byte("wörld 🎉 日本語"),
		[]byte("\f{\"type\":\"not-an-event\",\"data\":1}\f\n"),
		bytes.Repeat([]byte("raw text ✓ "), 100*1024/13),
	}
	var binary []byte
	for i := range 4 * 256 {
		binary = append(binary, byte(i))
	}
	noise := make([]byte, 100*1024)
	for i, x := 0, uint32(1); i < len(noise); i++ {
		x = x*1664525 + 1013904223 // deterministic bytes, most of them invalid UTF-8
		noise[i] = byte(x >> 24)
	}
	return map[string]rawMode{
		"raw-utf8": {encoding: "utf8", chunks: text},
		// Only 'hex' makes node-ipc's raw mode binary safe (see the file comment).
		"raw-hex": {encoding: "hex", chunks: [][]byte{binary, []byte("\xff\xfe\xc3"), noise}},
	}
}

func TestNodeIPCCompat(t *testing.T) {
	modules := requireNodeIPC(t)
	modes := []string{"events", "raw-utf8", "raw-hex"}
	for _, p := range nodeIPCPackages {
		for _, transport := range []string{"unix", "tcp"} {
			for _, goRole := range []string{"go-server", "go-client"} {
				for _, mode := range modes {
					t.Run(strings.Join([]string{p.Dir, transport, goRole, mode}, "/"), func(t *testing.T) {
						runCompat(t, modules[p.Dir], transport, goRole == "go-server", mode)
					})
				}
			}
		}
	}
}

func runCompat(t *testing.T, module, transport string, goServer bool, mode string) {
	cfg := peerConfig{Module: module, Transport: transport, ID: "compat", TimeoutMs: int(compatWait / time.Millisecond)}
	opts := []ipc.Option{ipc.WithMaxMessageBytes(1 << 20)}
	var raw rawMode
	if mode == "events" {
		opts = append(opts, ipc.WithFraming(ipc.NodeIPC))
		for _, c := range compatCases() {
			cfg.Events = append(cfg.Events, peerEvent{Type: c.Type, Data: json.RawMessage(c.Data)})
		}
	} else {
		raw = rawModes()[mode]
		opts = append(opts, ipc.WithFraming(ipc.Raw))
		cfg.RawBuffer, cfg.Encoding, cfg.Raw = true, raw.encoding, raw.chunks
	}
	var reported errorLog
	opts = append(opts, ipc.WithErrorHandler(func(_ *ipc.Socket, err error) { reported.add(err) }))

	network, addr := "tcp", "127.0.0.1:0"
	if transport == "unix" {
		// node-ipc's own default path composition, with a short root: sun_path is 108 bytes.
		cfg.SocketRoot, cfg.Appspace = shortTempDir(t)+"/", "app."
		network, addr = "unix", ipc.SocketPath(cfg.SocketRoot, cfg.Appspace, cfg.ID)
	}

	var sock *ipc.Socket
	var peer *nodePeer
	if goServer {
		cfg.Role = "client"
		srv, err := ipc.Listen(network, addr, opts...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = srv.Close() })
		if network == "tcp" {
			cfg.Port = srv.Addr().(*net.TCPAddr).Port
		}
		peer = startPeer(t, cfg)
		select {
		case sock = <-srv.Connections():
		case <-peer.exited:
			t.Fatalf("node-ipc client exited (%v) before connecting; stderr:\n%s", peer.err, peer.stderr.String())
		case <-time.After(compatWait):
			t.Fatalf("node-ipc client never connected; node stderr:\n%s", peer.stderr.String())
		}
	} else {
		cfg.Role = "server"
		peer = startPeer(t, cfg)
		m := peer.next(t, "listening")
		if network == "unix" && m.Path != addr {
			t.Fatalf("node-ipc serves socketRoot+appspace+id at %q, ipc.SocketPath gives %q", m.Path, addr)
		}
		if network == "tcp" {
			addr = fmt.Sprintf("127.0.0.1:%d", m.Port)
		}
		ctx, cancel := context.WithTimeout(t.Context(), compatWait)
		defer cancel()
		var err error
		if sock, err = ipc.Dial(ctx, network, addr, opts...); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { _ = sock.Close() })
	peer.next(t, "connected")

	if mode == "events" {
		exchangeEvents(t, sock, peer, compatCases())
	} else {
		exchangeRaw(t, sock, peer, raw.chunks)
	}

	// Our close is node's cue to exit 0; any other exit status means it saw a failure.
	if err := sock.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	peer.wait(t)
	if errs := reported.get(); len(errs) > 0 {
		t.Errorf("pkg/ipc reported errors during a valid exchange: %v", errs)
	}
}

// exchangeEvents sends every case from Go while node-ipc sends every case to Go, then
// checks both sides saw each event exactly, in order.
func exchangeEvents(t *testing.T, sock *ipc.Socket, peer *nodePeer, cases []compatCase) {
	sent := sendAll(sock, len(cases), func(i int) (string, error) {
		b, err := ipc.EncodeEvent(cases[i].Type, json.RawMessage(cases[i].Data))
		return string(b), err
	})

	for i, c := range cases {
		data := c.Data
		if c.FromNode != "" {
			data = c.FromNode
		}
		typ, err := json.Marshal(c.Type)
		if err != nil {
			t.Fatal(err)
		}
		want := `{"type":` + string(typ) + `,"data":` + data + `}`
		got := receive(t, sock, fmt.Sprintf("event %d (%s) from node-ipc", i, c.Type))
		if got != want {
			t.Fatalf("event %d from node-ipc: In() yielded\n%s\nwant node-ipc's frame verbatim\n%s", i, clip(got), clip(want))
		}
		ev, err := ipc.DecodeEvent([]byte(got))
		if err != nil {
			t.Fatalf("event %d from node-ipc: DecodeEvent: %v", i, err)
		}
		if ev.Type != c.Type || string(ev.Data) != data {
			t.Fatalf("event %d from node-ipc: DecodeEvent = {%q, %s}, want {%q, %s}", i, ev.Type, clip(string(ev.Data)), c.Type, clip(data))
		}
	}
	waitSent(t, sent)

	for i, c := range cases {
		m := peer.next(t, "recv")
		// node reports JSON.stringify of what its handler received, so equal text means
		// equal values (Data is written in JSON.stringify's form).
		if m.Type != c.Type || m.Data != c.Data {
			t.Fatalf("event %d from Go: node-ipc handler got {%q, %s}, want {%q, %s}", i, m.Type, clip(m.Data), c.Type, clip(c.Data))
		}
	}
	peer.next(t, "done")
}

// exchangeRaw checks rawBuffer mode: node-ipc emits chunks, Go writes the same bytes cut
// at other places (splitting UTF-8 sequences), and each side must read the exact stream.
func exchangeRaw(t *testing.T, sock *ipc.Socket, peer *nodePeer, chunks [][]byte) {
	want := bytes.Join(chunks, nil)
	// Cut Go's copy into 7-byte pieces first, then the rest, so boundaries differ from node's.
	var pieces []string
	rest := want
	for len(rest) > 0 && len(pieces) < 64 {
		n := min(7, len(rest))
		pieces = append(pieces, string(rest[:n]))
		rest = rest[n:]
	}
	if len(rest) > 0 {
		pieces = append(pieces, string(rest))
	}
	sent := sendAll(sock, len(pieces), func(i int) (string, error) { return pieces[i], nil })

	var got []byte
	for len(got) < len(want) {
		got = append(got, receive(t, sock, fmt.Sprintf("raw bytes after %d of %d from node-ipc", len(got), len(want)))...)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("raw bytes from node-ipc differ from byte %d (got %d bytes, want %d)", firstDiff(got, want), len(got), len(want))
	}
	waitSent(t, sent)

	m := peer.next(t, "raw")
	if !bytes.Equal(m.B64, want) {
		t.Fatalf("raw bytes from Go: node-ipc got %d bytes differing from byte %d, want %d bytes", len(m.B64), firstDiff(m.B64, want), len(want))
	}
	peer.next(t, "done")
}

// sendAll writes n messages on Out() from a goroutine, so node-ipc's sending and Go's
// sending overlap, and reports the outcome on the returned channel.
func sendAll(sock *ipc.Socket, n int, msg func(int) (string, error)) <-chan error {
	done := make(chan error, 1)
	go func() {
		for i := range n {
			m, err := msg(i)
			if err != nil {
				done <- err
				return
			}
			select {
			case sock.Out() <- m:
			case <-sock.Done():
				err := sock.Err()
				if err == nil {
					err = errors.New("closed cleanly")
				}
				done <- fmt.Errorf("socket ended after %d of %d sends: %w", i, n, err)
				return
			}
		}
		done <- nil
	}()
	return done
}

func waitSent(t *testing.T, sent <-chan error) {
	t.Helper()
	select {
	case err := <-sent:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(compatWait):
		t.Fatal("Go could not hand all messages to Out()")
	}
}

func receive(t *testing.T, sock *ipc.Socket, what string) string {
	t.Helper()
	select {
	case m, ok := <-sock.In():
		if !ok {
			t.Fatalf("%s: In() closed, Err() = %v", what, sock.Err())
		}
		return m
	case <-time.After(compatWait):
		t.Fatalf("%s: nothing within %v", what, compatWait)
	}
	return ""
}

// peerConfig is hack/nodeipc/peer.cjs's configuration file.
type peerConfig struct {
	Module     string      `json:"module"`
	Role       string      `json:"role"`
	Transport  string      `json:"transport"`
	SocketRoot string      `json:"socketRoot,omitempty"`
	Appspace   string      `json:"appspace,omitempty"`
	ID         string      `json:"id"`
	Port       int         `json:"port,omitempty"`
	RawBuffer  bool        `json:"rawBuffer"`
	Encoding   string      `json:"encoding,omitempty"`
	Events     []peerEvent `json:"events,omitempty"`
	Raw        [][]byte    `json:"raw,omitempty"` // base64, as encoding/json writes []byte
	TimeoutMs  int         `json:"timeoutMs"`
}

type peerEvent struct {
	Type string          `json:"type"`
	Data json.RawMessage `json:"data"`
}

// peerMsg is one line peer.cjs prints.
type peerMsg struct {
	Ev   string `json:"ev"`
	Type string `json:"type"`
	Data string `json:"data"`
	B64  []byte `json:"b64"`
	Path string `json:"path"`
	Port int    `json:"port"`
	Msg  string `json:"msg"`
	Line string `json:"-"`
}

// nodePeer is a running peer.cjs. Its process is killed in t.Cleanup if still running.
type nodePeer struct {
	msgs   chan peerMsg // closed when node's stdout ends
	stderr *lockedBuffer
	exited chan struct{}
	err    error // cmd.Wait's result, set before exited closes
}

func startPeer(t *testing.T, cfg peerConfig) *nodePeer {
	t.Helper()
	path := filepath.Join(t.TempDir(), "peer.json")
	data, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("node", filepath.Join(repoRoot(t), "hack/nodeipc/peer.cjs"), path)
	p := &nodePeer{msgs: make(chan peerMsg, 1024), stderr: &lockedBuffer{}, exited: make(chan struct{})}
	cmd.Stderr = p.stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64*1024), 8<<20) // a "recv" line carries the 100 KiB event
		for sc.Scan() {
			m := peerMsg{Line: sc.Text()}
			if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
				m.Ev = "unparsed"
			}
			p.msgs <- m
		}
		close(p.msgs)
		// Wait only after stdout is drained: it closes the pipe.
		p.err = cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
			return
		default:
		}
		_ = cmd.Process.Kill()
		// Drain stdout so the reader goroutine reaches cmd.Wait.
		go func() {
			for range p.msgs {
			}
		}()
		<-p.exited
	})
	return p
}

// next returns node's next report and fails unless it is the one expected.
func (p *nodePeer) next(t *testing.T, ev string) peerMsg {
	t.Helper()
	select {
	case m, ok := <-p.msgs:
		if !ok {
			<-p.exited
			t.Fatalf("node-ipc peer exited (%v) while Go waited for %q; stderr:\n%s", p.err, ev, p.stderr.String())
		}
		if m.Ev != ev {
			t.Fatalf("node-ipc peer reported %s while Go waited for %q; stderr:\n%s", clip(m.Line), ev, p.stderr.String())
		}
		return m
	case <-time.After(compatWait):
		t.Fatalf("node-ipc peer did not report %q within %v", ev, compatWait)
	}
	return peerMsg{}
}

// wait expects node to exit 0 on its own once Go has closed the connection.
func (p *nodePeer) wait(t *testing.T) {
	t.Helper()
	select {
	case <-p.exited:
		if p.err != nil {
			t.Fatalf("node-ipc peer: %v; stderr:\n%s", p.err, p.stderr.String())
		}
	case <-time.After(compatWait):
		t.Fatal("node-ipc peer did not exit after Go closed the connection")
	}
}

// lockedBuffer is an io.Writer for a child's stderr that the test may read concurrently.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// errorLog collects what pkg/ipc's error handler reports, from its own goroutines.
type errorLog struct {
	mu   sync.Mutex
	errs []error
}

func (l *errorLog) add(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.errs = append(l.errs, err)
}

func (l *errorLog) get() []error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]error(nil), l.errs...)
}

// shortTempDir is a temporary directory with a short path, for Unix socket names.
func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "nipc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

func clip(s string) string {
	if len(s) > 200 {
		return fmt.Sprintf("%s…(%d bytes)", s[:200], len(s))
	}
	return s
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestNodeIPCCompatOversized pins down the one limit the two sides do not share: node-ipc
// accepts events of any size, pkg/ipc ends a socket whose frame exceeds its maximum
// (64 KiB by default) with an error a user can recognise, rather than growing without bound.
func TestNodeIPCCompatOversized(t *testing.T) {
	modules := requireNodeIPC(t)
	for _, p := range nodeIPCPackages {
		t.Run(p.Dir, func(t *testing.T) {
			big := `"` + strings.Repeat("x", ipc.DefaultMaxMessageBytes) + `"`
			cfg := peerConfig{
				Module: modules[p.Dir], Role: "client", Transport: "unix", ID: "compat",
				SocketRoot: shortTempDir(t) + "/", Appspace: "app.", TimeoutMs: int(compatWait / time.Millisecond),
				Events: []peerEvent{{Type: "small", Data: json.RawMessage(`1`)}, {Type: "big", Data: json.RawMessage(big)}},
			}
			srv, err := ipc.Listen("unix", ipc.SocketPath(cfg.SocketRoot, cfg.Appspace, cfg.ID), ipc.WithFraming(ipc.NodeIPC))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = srv.Close() })
			peer := startPeer(t, cfg)
			var sock *ipc.Socket
			select {
			case sock = <-srv.Connections():
			case <-time.After(compatWait):
				t.Fatalf("node-ipc client never connected; node stderr:\n%s", peer.stderr.String())
			}
			t.Cleanup(func() { _ = sock.Close() })
			if got := receive(t, sock, "the small event"); got != `{"type":"small","data":1}` {
				t.Fatalf("first event: %s", got)
			}
			select {
			case m, ok := <-sock.In():
				if ok {
					t.Fatalf("In() yielded %s; want it closed after an oversized frame", clip(m))
				}
			case <-time.After(compatWait):
				t.Fatal("In() still open after node-ipc sent a frame over the limit")
			}
			if !errors.Is(sock.Err(), ipc.ErrMessageTooLarge) {
				t.Fatalf("Err() = %v, want ErrMessageTooLarge", sock.Err())
			}
		})
	}
}
