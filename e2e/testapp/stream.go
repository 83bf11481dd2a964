package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// stream is the workload of the fault suite (e2e/faults): on each channel given (a line port
// on localhost, or "-"), it sends the numbered line "s ME SEQ" RATE times a second for as long
// as it runs, and records every such line it receives, per channel and sender. A connection
// that ends (its sidecar was killed) is dialled again and the numbering goes on, so a restart
// shows as a gap, never as a new sender. The record is served as JSON on REPORT (GET /report),
// which the suite reads through the API server's pod proxy.
//
//	testapp stream BCAST ANY RATE REPORT
func stream(ctx context.Context, args []string) error {
	rate, err := strconv.Atoi(args[2])
	if err != nil || rate <= 0 {
		return fmt.Errorf("bad rate %q", args[2])
	}
	rec, srv, err := serveRecord(args[3])
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	for i, name := range []string{"bcast", "any"} {
		if args[i] == "-" {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			rec.channel(ctx, name, args[i], time.Second/time.Duration(rate))
		}()
	}
	wg.Wait()
	// The connections are drained (see send); keep the report up a little longer so
	// that the suite's last poll sees what arrived while draining.
	time.Sleep(2 * time.Second)
	_ = srv.Close()
	return nil
}

// record is what a stream app sent and received. Sent[channel] is the last SEQ written to the
// channel's connection; flows are per channel and sender.
type record struct {
	mu       sync.Mutex
	Me       string         `json:"me"`
	Sent     map[string]int `json:"sent"`
	Connects map[string]int `json:"connects"`
	recv     map[string]map[string]*flow
}

// flow is what one receiver got from one sender on one channel. Seen is a bitmap (bit SEQ set
// once SEQ arrived); a line below the highest SEQ so far that is not a duplicate arrived out of
// order.
type flow struct {
	Received  int `json:"received"`
	Duplicate int `json:"duplicates"`
	Reordered int `json:"reordered"`
	Max       int `json:"max"`
	seen      []byte
}

// channel keeps one channel's connection up and sends on it every interval.
func (r *record) channel(ctx context.Context, name, addr string, every time.Duration) {
	seq := 0
	for ctx.Err() == nil {
		conn, err := dialRetry(ctx, addr)
		if err != nil {
			time.Sleep(time.Second)
			continue
		}
		r.mu.Lock()
		r.Connects[name]++
		r.mu.Unlock()
		fmt.Println("connected", name, addr)
		seq = r.send(ctx, name, conn, seq, every)
		_ = conn.Close()
	}
}

// send writes numbered lines from seq+1 on until the connection or ctx ends, reading what
// arrives meanwhile, and returns the last SEQ written.
func (r *record) send(ctx context.Context, name string, conn net.Conn, seq int, every time.Duration) int {
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		sc := bufio.NewScanner(conn)
		for sc.Scan() {
			r.receive(name, sc.Text())
		}
		fmt.Println("connection ended", name, sc.Err())
	}()
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			drain(conn, ended)
			return seq
		case <-ended:
			return seq
		case <-tick.C:
		}
		if _, err := fmt.Fprintf(conn, "s %s %d\n", r.Me, seq+1); err != nil {
			fmt.Println("write", name, err)
			return seq
		}
		seq++
		r.mu.Lock()
		r.Sent[name] = seq
		r.mu.Unlock()
	}
}

func (r *record) receive(channel, line string) {
	f := strings.Fields(line)
	if len(f) < 3 || len(f) > 4 || f[0] != "s" { // flood pads its lines with a fourth field
		fmt.Println("unexpected line", channel, line)
		return
	}
	n, err := strconv.Atoi(f[2])
	if err != nil || n <= 0 {
		fmt.Println("unexpected line", channel, line)
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.recv[channel] == nil {
		r.recv[channel] = map[string]*flow{}
	}
	fl := r.recv[channel][f[1]]
	if fl == nil {
		fl = &flow{}
		r.recv[channel][f[1]] = fl
	}
	fl.add(n)
}

func (f *flow) add(n int) {
	f.Received++
	for len(f.seen) <= n/8 {
		f.seen = append(f.seen, 0)
	}
	switch bit := byte(1) << (n % 8); {
	case f.seen[n/8]&bit != 0:
		f.Duplicate++
	case n < f.Max:
		f.Reordered++
	}
	f.seen[n/8] |= byte(1) << (n % 8)
	f.Max = max(f.Max, n)
}

// report is the JSON of GET /report.
type report struct {
	*record
	Recv map[string]map[string]flowReport `json:"recv"`
	Time time.Time                        `json:"time"`
}

type flowReport struct {
	flow
	Seen string `json:"seen"` // base64 of the bitmap
}

func (r *record) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if req.URL.Path != "/report" {
		http.NotFound(w, req)
		return
	}
	r.mu.Lock()
	out := report{record: r, Recv: map[string]map[string]flowReport{}, Time: time.Now()}
	for ch, flows := range r.recv {
		out.Recv[ch] = map[string]flowReport{}
		for from, f := range flows {
			out.Recv[ch][from] = flowReport{flow: *f, Seen: base64.StdEncoding.EncodeToString(f.seen)}
		}
	}
	b, err := json.Marshal(out)
	r.mu.Unlock()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(b)
}

// drainTimeout bounds how long a stopping app reads what its sidecar still writes.
const drainTimeout = 5 * time.Second

// drain is how an app leaves a channel without losing a line: it closes its sending side,
// so the sidecar ends the connection (counting what was still queued for it
// receiver_closed), and reads until that end, so that every line the sidecar wrote
// (and so acknowledged) is read. Closing at once would discard what the kernel holds
// unread, which no sidecar can count. docs/guarantees.md, "app leaves".
func drain(conn net.Conn, ended <-chan struct{}) {
	if cw, ok := conn.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	select {
	case <-ended:
	case <-time.After(drainTimeout):
	}
}

// serveRecord makes this pod's record and serves it as JSON on addr (GET /report) until
// the returned server is closed; the fault suite reads it through the API server's pod proxy.
func serveRecord(addr string) (*record, *http.Server, error) {
	me, err := os.Hostname()
	if err != nil {
		return nil, nil, err
	}
	rec := &record{Me: me, Sent: map[string]int{}, Connects: map[string]int{}, recv: map[string]map[string]*flow{}}
	srv := &http.Server{Addr: addr, Handler: rec, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
			fmt.Fprintln(os.Stderr, "testapp: report server:", err)
			os.Exit(1)
		}
	}()
	return rec, srv, nil
}
