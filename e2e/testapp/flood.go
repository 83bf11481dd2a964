package main

import (
	"bufio"
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// flood is the workload of the fault suite's memory squeeze (e2e/faults): on the line port
// ADDR, the "send" role writes numbered lines "s ME SEQ PAD" of about 1 KiB as fast as the
// sidecar takes them for SECONDS, then leaves as an app should (closes its sending side and
// reads until the sidecar ends the connection); the "sink" role reads slowly (a line every
// 5 ms) for SECONDS from the first line it gets, so that its sidecar's queues fill, then at full speed. Both record what
// they sent and received as stream does, served as JSON on REPORT (GET /report).
//
//	testapp flood ADDR send|sink SECONDS REPORT
func flood(ctx context.Context, args []string) error {
	role := args[1]
	secs, err := strconv.Atoi(args[2])
	if err != nil || secs <= 0 || (role != "send" && role != "sink") {
		return fmt.Errorf("bad arguments %q", args)
	}
	rec, srv, err := serveRecord(args[3])
	if err != nil {
		return err
	}
	defer func() { _ = srv.Close() }()
	conn, err := dialRetry(ctx, args[0])
	if err != nil {
		return err
	}
	defer func() { _ = conn.Close() }()
	fmt.Println("connected", args[0], "as", role)
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		sc := bufio.NewScanner(conn)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		var slowUntil time.Time // SECONDS from the first line on
		for sc.Scan() {
			rec.receive("flood", sc.Text())
			if role != "sink" {
				continue
			}
			if slowUntil.IsZero() {
				slowUntil = time.Now().Add(time.Duration(secs) * time.Second)
			}
			if time.Now().Before(slowUntil) {
				time.Sleep(5 * time.Millisecond)
			}
		}
		fmt.Println("connection ended", sc.Err())
	}()
	if role == "sink" {
		select {
		case <-ctx.Done():
			drain(conn, ended)
		case <-ended:
		}
		return nil
	}
	pad := strings.Repeat("x", 1000)
	w := bufio.NewWriterSize(conn, 64<<10)
	seq := 0
	for until := time.Now().Add(time.Duration(secs) * time.Second); time.Now().Before(until) && ctx.Err() == nil; {
		for range 64 {
			seq++
			_, _ = fmt.Fprintf(w, "s %s %d %s\n", rec.Me, seq, pad)
		}
		if err := w.Flush(); err != nil {
			fmt.Println("write", err)
			break
		}
		rec.mu.Lock()
		rec.Sent["flood"] = seq
		rec.mu.Unlock()
	}
	fmt.Println("flood done", seq)
	drain(conn, ended)
	// Serve the report until the suite has read it (it deletes the Deployment).
	<-ctx.Done()
	return nil
}
