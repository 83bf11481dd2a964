//go:build unix

package ipc_test

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/podipc/podipc/pkg/ipc"
)

// nodeIPCBenchEvent is the event hack/nodeipc/bench.cjs sends Node to Node:
// {"type":"bench","data":{"seq":i,"payload":"xxx…"}} with a 64-byte payload.
type nodeIPCBenchEvent struct {
	Seq     int    `json:"seq"`
	Payload string `json:"payload"`
}

const nodeIPCBenchPayloadBytes = 64

// BenchmarkNodeIPCEvents measures node-ipc events/s from one Go socket to another, the
// Go side of make bench-nodeipc (hack/nodeipc/bench.cjs is node-ipc 9.2.1 Node to Node,
// same event shape and size). Three ways of using pkg/ipc, from most to least work:
//
//   - decoded: what a node-ipc application does per event on each side — the sender
//     encodes the value (EncodeEvent, like node-ipc's JSON.stringify) and sends it on
//     Out(); the receiver takes it from In() and decodes the event and its data
//     (DecodeEvent and json.Unmarshal, like node-ipc's JSON.parse).
//   - frames: what the sidecar does — frames pass through Out() and In() verbatim (each
//     is still validated as a JSON event on read), never decoded into values.
//   - framing: the same frames through the public Writer and Reader on the connection,
//     without a channel operation per event (the sidecar's batch path).
//
// Besides events/s it reports the CPU time of both ends per event, which is steadier than
// wall-clock rates on a busy shared machine.
func BenchmarkNodeIPCEvents(b *testing.B) {
	for _, network := range []string{"unix", "tcp"} {
		b.Run(network, func(b *testing.B) {
			b.Run("decoded", func(b *testing.B) { benchNodeIPCChannels(b, network, true) })
			b.Run("frames", func(b *testing.B) { benchNodeIPCChannels(b, network, false) })
			b.Run("framing", func(b *testing.B) { benchNodeIPCFraming(b, network) })
		})
	}
}

func benchNodeIPCChannels(b *testing.B, network string, decode bool) {
	server, client := nodeIPCBenchPair(b, network)
	payload := strings.Repeat("x", nodeIPCBenchPayloadBytes)
	received := make(chan error, 1)
	b.ResetTimer()
	cpu0 := processCPUTime(b)
	go func() {
		var ev nodeIPCBenchEvent
		for i := range b.N {
			msg, ok := <-server.In()
			if !ok {
				received <- server.Err()
				return
			}
			if !decode {
				continue
			}
			e, err := ipc.DecodeEvent([]byte(msg))
			if err == nil {
				err = json.Unmarshal(e.Data, &ev)
			}
			if err != nil || ev.Seq != i {
				b.Errorf("event %d: %v (seq %d)", i, err, ev.Seq)
			}
		}
		received <- nil
	}()
	var frame []byte
	for i := range b.N {
		var msg string
		if decode {
			enc, err := ipc.EncodeEvent("bench", nodeIPCBenchEvent{Seq: i, Payload: payload})
			if err != nil {
				b.Fatal(err)
			}
			msg = string(enc)
		} else {
			frame = appendNodeIPCBenchFrame(frame[:0], i, payload)
			msg = string(frame)
		}
		client.Out() <- msg
	}
	if err := <-received; err != nil {
		b.Fatal(err)
	}
	reportNodeIPCEvents(b, cpu0)
}

func benchNodeIPCFraming(b *testing.B, network string) {
	srv, conn := nodeIPCBenchConns(b, network)
	payload := strings.Repeat("x", nodeIPCBenchPayloadBytes)
	received := make(chan error, 1)
	b.ResetTimer()
	cpu0 := processCPUTime(b)
	go func() {
		r := ipc.NewReader(srv, ipc.NodeIPC, 0)
		for range b.N {
			if _, err := r.Next(); err != nil {
				received <- err
				return
			}
		}
		received <- nil
	}()
	w := ipc.NewWriter(conn, ipc.NodeIPC)
	var frame []byte
	for i := range b.N {
		frame = appendNodeIPCBenchFrame(frame[:0], i, payload)
		if err := w.WriteMessage(frame); err != nil {
			b.Fatal(err)
		}
	}
	if err := w.Flush(); err != nil {
		b.Fatal(err)
	}
	if err := <-received; err != nil {
		b.Fatal(err)
	}
	reportNodeIPCEvents(b, cpu0)
}

// appendNodeIPCBenchFrame appends the benchmark event's JSON text, as EncodeEvent writes it.
func appendNodeIPCBenchFrame(dst []byte, seq int, payload string) []byte {
	dst = append(dst, `{"type":"bench","data":{"seq":`...)
	dst = strconv.AppendInt(dst, int64(seq), 10)
	dst = append(dst, `,"payload":"`...)
	dst = append(dst, payload...)
	return append(dst, `"}}`...)
}

func reportNodeIPCEvents(b *testing.B, cpu0 time.Duration) {
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
	b.ReportMetric(float64(processCPUTime(b)-cpu0)/float64(time.Microsecond)/float64(b.N), "cpu-µs/event")
}

// nodeIPCBenchPair returns two connected NodeIPC sockets, closed when the benchmark ends.
func nodeIPCBenchPair(b *testing.B, network string) (server, client *ipc.Socket) {
	srv, err := ipc.Listen(network, nodeIPCBenchAddress(b, network), ipc.WithFraming(ipc.NodeIPC))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = srv.Close() })
	client, err = ipc.Dial(context.Background(), network, srv.Addr().String(), ipc.WithFraming(ipc.NodeIPC))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = client.Close() })
	server = <-srv.Connections()
	b.Cleanup(func() { _ = server.Close() })
	return server, client
}

// nodeIPCBenchConns returns the two ends of a plain connection, closed when the benchmark ends.
func nodeIPCBenchConns(b *testing.B, network string) (server, client net.Conn) {
	ln, err := net.Listen(network, nodeIPCBenchAddress(b, network))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = ln.Close() })
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			b.Error(err)
		}
		accepted <- c
	}()
	client, err = net.Dial(network, ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = client.Close() })
	server = <-accepted
	if server == nil {
		b.FailNow()
	}
	b.Cleanup(func() { _ = server.Close() })
	return server, client
}

func nodeIPCBenchAddress(b *testing.B, network string) string {
	if network == "unix" {
		return filepath.Join(b.TempDir(), "bench.sock")
	}
	return "127.0.0.1:0"
}

// BenchmarkNodeIPCHelpers measures the per-event work of the node-ipc helpers on the
// benchmark event, single-threaded: building a frame (EncodeEvent), parsing one
// (DecodeEvent), and the validation the NodeIPC Writer does before buffering a frame.
func BenchmarkNodeIPCHelpers(b *testing.B) {
	payload := strings.Repeat("x", nodeIPCBenchPayloadBytes)
	frame := appendNodeIPCBenchFrame(nil, 123456, payload)
	b.Run("EncodeEvent", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			if _, err := ipc.EncodeEvent("bench", nodeIPCBenchEvent{Seq: i, Payload: payload}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("DecodeEvent", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := ipc.DecodeEvent(frame); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("WriteMessageString", func(b *testing.B) {
		b.ReportAllocs()
		w := ipc.NewWriter(io.Discard, ipc.NodeIPC)
		msg := string(frame)
		for b.Loop() {
			if err := w.WriteMessageString(msg); err != nil {
				b.Fatal(err)
			}
		}
	})
}
