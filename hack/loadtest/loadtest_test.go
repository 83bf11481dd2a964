package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
	"time"
)

// The checker is what makes a figure trustworthy: it must reject exactly the lines a
// broken path would deliver.
func TestCheckerRejectsLossReorderAndBadLines(t *testing.T) {
	tests := map[string]struct {
		seqs    []uint64
		lossy   bool
		mangle  func([]byte) []byte
		wantErr string
		gaps    uint64
	}{
		"in order":          {seqs: []uint64{0, 1, 2, 3}},
		"loss":              {seqs: []uint64{0, 1, 3}, wantErr: "got seq 3, want 2"},
		"reorder":           {seqs: []uint64{0, 2, 1}, wantErr: "got seq 2, want 1"},
		"duplicate":         {seqs: []uint64{0, 1, 1}, wantErr: "got seq 1, want 2"},
		"lossy gap counted": {seqs: []uint64{0, 4, 5, 9}, lossy: true, gaps: 6},
		"lossy reorder":     {seqs: []uint64{0, 4, 3}, lossy: true, wantErr: "got seq 3, want 5", gaps: 3},
		"short line":        {seqs: []uint64{0}, mangle: func(b []byte) []byte { return b[:len(b)-2] }, wantErr: "got 62 bytes"},
		"garbled seq":       {seqs: []uint64{0}, mangle: func(b []byte) []byte { b[3] = 'z'; return b }, wantErr: "no sequence number"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			c := newChecker(64, tc.lossy)
			var err error
			for _, s := range tc.seqs {
				line := newLine(64)
				putSeq(line, s)
				if tc.mangle != nil {
					line = tc.mangle(line)
				}
				if err = c.consume(line); err != nil {
					break
				}
			}
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("unexpected error: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
			}
			if c.gaps != tc.gaps {
				t.Errorf("gaps %d, want %d", c.gaps, tc.gaps)
			}
		})
	}
}

func TestSyncLinesAreNotCounted(t *testing.T) {
	c := newChecker(64, false)
	if err := c.consume(newSyncLine(64)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.synced:
	default:
		t.Fatal("a sync line did not mark the path synced")
	}
	if n := c.count.Load(); n != 0 {
		t.Fatalf("count %d after a sync line, want 0", n)
	}
}

// lineReader must split lines whatever the read boundaries, and keep a partial line
// across a failed read so that a timed-out ReadReply can be retried.
func TestLineReaderKeepsPartialLines(t *testing.T) {
	var in bytes.Buffer
	for i := range 100 {
		l := newLine(18 + i%50)
		putSeq(l, uint64(i))
		in.Write(l)
	}
	r := newLineReader(iotest.TimeoutReader(iotest.OneByteReader(bytes.NewReader(in.Bytes()))), 128)
	var out bytes.Buffer
	timeouts := 0
	for {
		line, err := r.readLine()
		if errors.Is(err, iotest.ErrTimeout) {
			timeouts++
			continue
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		out.Write(line)
	}
	if timeouts != 1 {
		t.Fatalf("%d timeouts, want 1", timeouts)
	}
	if !bytes.Equal(out.Bytes(), in.Bytes()) {
		t.Fatal("lines read differ from lines written")
	}
}

// The relay and the measurement loops together, in process: a short closed-loop run and
// a short latency run through two relays must check every line.
func TestMeasureThroughTwoRelays(t *testing.T) {
	recv, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = recv.Close() })
	r2 := startTestRelay(t, recv.Addr().String())
	r1 := startTestRelay(t, r2)
	open := func(ctx context.Context) (path, error) { return dialAccept(ctx, r1, recv.(*net.TCPListener)) }

	res, err := measureThroughput(t.Context(), open, func() usage { return usage{} }, nil, 100, 50*time.Millisecond, 200*time.Millisecond, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if res.received == 0 || res.rate <= 0 {
		t.Fatalf("nothing measured: %+v", res)
	}
	rtt, err := measureRTT(t.Context(), open, 64, 10, 200, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if rtt.samples != 200 || rtt.p50 <= 0 || rtt.p99 < rtt.p50 {
		t.Fatalf("bad latency result: %+v", rtt)
	}
}

// startTestRelay runs the relay's accept loop in process and returns its address.
func startTestRelay(t *testing.T, to string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { _ = ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { relayConn(t.Context(), c, to) })
		}
	})
	return ln.Addr().String()
}
