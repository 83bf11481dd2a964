package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"sync"
)

// runRelay is the baseline forwarder, run as its own process by `loadtest relay`: for
// every accepted connection it dials the next hop and copies lines both ways, one
// goroutine per direction. It frames lines like the sidecar does (so it does the same
// parsing work) and flushes only when no more input is already buffered, the same
// batching rule the sidecar follows. It is deliberately all a relay needs and no more.
func runRelay(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("relay", flag.ContinueOnError)
	listen := fs.String("listen", "", "address to accept on")
	to := fs.String("to", "", "address of the next hop")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", *listen)
	if err != nil {
		return err
	}
	if _, err := fmt.Fprintln(os.Stdout, "ready"); err != nil { // The parent waits for this line.
		return err
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go relayConn(ctx, c, *to)
	}
}

func relayConn(ctx context.Context, c net.Conn, to string) {
	defer func() { _ = c.Close() }()
	var d net.Dialer
	up, err := d.DialContext(ctx, "tcp", to)
	if err != nil {
		fmt.Fprintln(os.Stderr, "relay: dial:", err)
		return
	}
	defer func() { _ = up.Close() }()
	var wg sync.WaitGroup
	wg.Go(func() { relayLines(up, c) })
	relayLines(c, up)
	wg.Wait()
}

// relayLines copies whole lines from src to dst until src ends, then half-closes dst so
// the end travels on.
func relayLines(dst, src net.Conn) {
	r := newLineReader(src, ioBufSize)
	w := bufio.NewWriterSize(dst, ioBufSize)
	defer func() {
		_ = w.Flush()
		if tc, ok := dst.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
	}()
	for {
		line, err := r.readLine()
		if err != nil {
			return
		}
		if _, err := w.Write(line); err != nil {
			return
		}
		if r.buffered() == 0 {
			if err := w.Flush(); err != nil {
				return
			}
		}
	}
}
