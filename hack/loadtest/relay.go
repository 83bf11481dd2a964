package main

import (
	"bufio"
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
func runRelay(args []string) error {
	fs := flag.NewFlagSet("relay", flag.ContinueOnError)
	listen := fs.String("listen", "", "address to accept on")
	to := fs.String("to", "", "address of the next hop")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	fmt.Fprintln(os.Stdout, "ready") // The parent waits for this line.
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go relayConn(c, *to)
	}
}

func relayConn(c net.Conn, to string) {
	defer c.Close()
	up, err := net.Dial("tcp", to)
	if err != nil {
		fmt.Fprintln(os.Stderr, "relay: dial:", err)
		return
	}
	defer up.Close()
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
		w.Flush()
		if tc, ok := dst.(*net.TCPConn); ok {
			tc.CloseWrite()
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
