package ipc_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/podipc/podipc/pkg/ipc"
)

// BenchmarkThroughput moves b.N messages one way over one connection and reports
// messages per second, through three stacks on the same transport:
//
//   - channel: Socket.Out() on one end to Socket.In() on the other;
//   - framing: Writer.WriteMessage to Reader.Next, no channels;
//   - bufio: the baseline, bufio.Writer to bufio.Reader.ReadSlice.
//
// Besides msgs/s it reports the CPU time of both ends per message, which is steadier on
// a busy machine. The figures in docs/performance.md come from
// go test -run '^$' -bench Throughput -benchmem -count 5 ./pkg/ipc/ on the machine named there.
func BenchmarkThroughput(b *testing.B) {
	stacks := []struct {
		name string
		run  func(b *testing.B, client, server net.Conn, msg string)
	}{
		{"channel", benchChannel},
		{"framing", benchFraming},
		{"bufio", benchBufio},
	}
	for _, network := range networks {
		for _, size := range []int{64, 1024} {
			msg := strings.Repeat("m", size)
			for _, stack := range stacks {
				b.Run(fmt.Sprintf("%s/%s/%dB", network, stack.name, size), func(b *testing.B) {
					client, server := connPair(b, network)
					b.SetBytes(int64(size + 1))
					b.ReportAllocs()
					b.ResetTimer()
					cpu0 := processCPUTime(b)
					stack.run(b, client, server, msg)
					b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
					// CPU per message (both ends, all threads) barely moves with the
					// neighbours' load, unlike msgs/s.
					b.ReportMetric(float64(processCPUTime(b)-cpu0)/float64(b.N), "cpu-ns/msg")
				})
			}
		}
	}
}

func benchChannel(b *testing.B, client, server net.Conn, msg string) {
	c, s := ipc.NewSocket(client), ipc.NewSocket(server)
	go func() {
		for range b.N {
			c.Out() <- msg
		}
	}()
	for range b.N {
		if _, ok := <-s.In(); !ok {
			b.Fatalf("In() closed: %v", s.Err())
		}
	}
	b.StopTimer()
	_ = c.Close()
	_ = s.Close()
}

func benchFraming(b *testing.B, client, server net.Conn, msg string) {
	payload := []byte(msg)
	errc := make(chan error, 1)
	go func() {
		w := ipc.NewWriter(client, ipc.Lines)
		for range b.N {
			if err := w.WriteMessage(payload); err != nil {
				errc <- err
				return
			}
		}
		errc <- w.Flush()
	}()
	r := ipc.NewReader(server, ipc.Lines, 0)
	for range b.N {
		if _, err := r.Next(); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if err := <-errc; err != nil {
		b.Fatal(err)
	}
}

func benchBufio(b *testing.B, client, server net.Conn, msg string) {
	payload := []byte(msg)
	errc := make(chan error, 1)
	go func() {
		w := bufio.NewWriterSize(client, 64<<10)
		for range b.N {
			_, _ = w.Write(payload)
			_ = w.WriteByte('\n')
		}
		errc <- w.Flush()
	}()
	r := bufio.NewReaderSize(server, 64<<10)
	for range b.N {
		if _, err := r.ReadSlice('\n'); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if err := <-errc; err != nil {
		b.Fatal(err)
	}
}

// connPair returns both ends of one loopback TCP or Unix connection.
func connPair(b *testing.B, network string) (client, server net.Conn) {
	b.Helper()
	addr := "127.0.0.1:0"
	if network == "unix" {
		dir, err := os.MkdirTemp("", "ipc-bench")
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = os.RemoveAll(dir) })
		addr = filepath.Join(dir, "s")
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(context.Background(), network, addr)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	accepted := make(chan net.Conn, 1)
	go func() {
		conn, _ := ln.Accept()
		accepted <- conn
	}()
	var d net.Dialer
	client, err = d.DialContext(context.Background(), network, ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	server = <-accepted
	if server == nil {
		b.Fatal("accept failed")
	}
	b.Cleanup(func() { _ = client.Close(); _ = server.Close() })
	return client, server
}
