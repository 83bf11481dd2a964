package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// talk is what an app in a podipc member pod does, on two channels served by its sidecar on
// localhost: BCAST (a Broadcast channel's line port) and ANY (an AnyOne channel's, or "-").
//
// The pod first finds its PEERS-1 peers on BCAST: it sends "hello ME HEARD SEQ" every 500 ms,
// for as long as it runs, HEARD being how many peers it has heard and SEQ counting from 1. Once every peer has said hello with HEARD = PEERS-1,
// every peer both hears this pod and is heard by it, so no line sent from then on can fall in
// the gap before a peer connected. The pod then sends N numbered lines "data ME I" on BCAST,
// and N lines "any ME I" on ANY, logging "sent N". It logs "recv LINE" for every data and any
// line it receives, "recv hello FROM SEQ" for every hello, and runs until SIGTERM. The suite
// checks delivery, order and spread from these logs; the endless hellos are the stream that
// must flow between survivors, without a gap, while other members come and go.
func talk(ctx context.Context, args []string) error {
	peers, err := strconv.Atoi(args[2])
	if err != nil {
		return err
	}
	n, err := strconv.Atoi(args[3])
	if err != nil {
		return err
	}
	me, err := os.Hostname()
	if err != nil {
		return err
	}
	// ANY first: by the time the BCAST handshake is over, the peers' sidecars have long
	// advertised their ANY connections.
	var anyConn net.Conn
	if args[1] != "-" {
		if anyConn, err = dialRetry(ctx, args[1]); err != nil {
			return err
		}
		defer func() { _ = anyConn.Close() }()
		fmt.Println("connected", args[1])
	}
	bcast, err := dialRetry(ctx, args[0])
	if err != nil {
		return err
	}
	defer func() { _ = bcast.Close() }()
	fmt.Println("connected", args[0])

	var (
		mu    sync.Mutex
		heard = map[string]int{} // peer -> the HEARD it last said
		out   sync.Mutex         // one writer at a time on bcast
	)
	// done is closed when a connection ends: the app exits and the kubelet restarts it, which
	// the suite sees as a restart count (and missing lines).
	done := make(chan error, 2)
	read := func(c net.Conn) {
		sc := bufio.NewScanner(c)
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			switch {
			case len(f) == 4 && f[0] == "hello":
				h, _ := strconv.Atoi(f[2])
				mu.Lock()
				heard[f[1]] = h
				mu.Unlock()
				fmt.Println("recv hello", f[1], f[3])
			default:
				fmt.Println("recv", sc.Text())
			}
		}
		err := sc.Err()
		if err == nil {
			err = io.EOF
		}
		done <- fmt.Errorf("connection to %s ended: %w", c.RemoteAddr(), err)
	}
	go read(bcast)
	if anyConn != nil {
		go read(anyConn)
	}
	send := func(c net.Conn, line string) error {
		out.Lock()
		defer out.Unlock()
		_, err := fmt.Fprintln(c, line)
		return err
	}

	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	sent := false
	for hello := 1; ; hello++ {
		select {
		case <-ctx.Done():
			return nil
		case err := <-done:
			return err
		case <-tick.C:
		}
		mu.Lock()
		count, all := len(heard), len(heard) >= peers-1
		for _, h := range heard {
			all = all && h >= peers-1
		}
		mu.Unlock()
		if err := send(bcast, fmt.Sprintf("hello %s %d %d", me, count, hello)); err != nil {
			return err
		}
		if sent || !all {
			continue
		}
		sent = true
		fmt.Println("ready")
		for i := 1; i <= n; i++ {
			if err := send(bcast, fmt.Sprintf("data %s %d", me, i)); err != nil {
				return err
			}
			if anyConn != nil {
				if _, err := fmt.Fprintf(anyConn, "any %s %d\n", me, i); err != nil {
					return err
				}
				// Spaced out, so the round robin has every peer to choose from.
				time.Sleep(20 * time.Millisecond)
			}
		}
		fmt.Println("sent", n)
	}
}

func dialRetry(ctx context.Context, addr string) (net.Conn, error) {
	var d net.Dialer
	deadline := time.Now().Add(2 * time.Minute)
	for {
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err == nil || time.Now().After(deadline) || ctx.Err() != nil {
			return conn, err
		}
		time.Sleep(500 * time.Millisecond)
	}
}
