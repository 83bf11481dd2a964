// Command loadtest measures the podipc data plane against a plain TCP relay and NATS,
// on loopback: lines per second from one sending app to one receiving app, round-trip
// latency through an echoing receiver, the sidecars' memory idle and under load, and an
// open-loop overload run. It prints a Markdown report for docs/performance.md.
//
//	sending app → sidecar A → sidecar B → receiving app      (podipc, channel "bench")
//	sending app → relay 1   → relay 2   → receiving app      (the baseline)
//	publisher   → nats-server           → subscriber         (NATS)
//
// Every line carries a sequence number the receiving app checks, so loss or reordering
// fails a run instead of producing a figure. Runs of the three targets are interleaved,
// so that a change in the machine's load affects all three alike.
//
// `loadtest relay -listen ADDR -to ADDR` runs one baseline relay; the tool starts two.
// `loadtest scale` measures how the cost grows with the members of a channel (scale.go).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// config holds the command-line flags.
type config struct {
	sidecar, natsServer string
	sidecarArgs         string
	targets             []string
	sizes               []int
	runs                int
	duration, warmup    time.Duration
	window              int
	queueBytes          int
	rttSamples          int
	rttWarmup           int
	rttLimit            time.Duration
	overloadFactor      float64
	overloadDuration    time.Duration
	addrA, addrB        string
	mtlsA, mtlsB        string
	relayAddrs          []string
	out                 string
	perfDir             string
	workDir             string
}

func main() {
	os.Exit(mainCode())
}

func mainCode() int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if len(os.Args) > 1 && os.Args[1] == "relay" {
		// The relay serves until its parent kills it, so it only returns on failure.
		fmt.Fprintln(os.Stderr, "relay:", runRelay(ctx, os.Args[2:]))
		return 1
	}
	if len(os.Args) > 1 && os.Args[1] == "scale" {
		cfg, err := parseScaleFlags(os.Args[2:])
		if err != nil {
			return 2
		}
		if err := runScale(ctx, cfg); err != nil {
			fmt.Fprintln(os.Stderr, "loadtest scale:", err)
			return 1
		}
		return 0
	}
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		return 2
	}
	if err := run(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "loadtest:", err)
		return 1
	}
	return 0
}

func parseFlags(args []string) (config, error) {
	var c config
	var targets, sizes, relays string
	fs := flag.NewFlagSet("loadtest", flag.ContinueOnError)
	fs.StringVar(&c.sidecar, "sidecar", "bin/podipc-sidecar", "podipc sidecar binary")
	fs.StringVar(&c.sidecarArgs, "sidecar-args", "", "extra sidecar flags, space-separated")
	fs.StringVar(&c.natsServer, "nats-server", "bin/nats-server", "nats-server binary")
	fs.StringVar(&targets, "targets", "podipc,relay,nats", "systems to measure: podipc, podipc-mtls (peer links over mutual TLS), relay, nats")
	fs.StringVar(&sizes, "sizes", "64,1024", "line sizes in bytes, '\\n' included")
	fs.IntVar(&c.runs, "runs", 5, "throughput runs per target and size (the median is reported)")
	fs.DurationVar(&c.duration, "duration", 3*time.Second, "measured time of one throughput run")
	fs.DurationVar(&c.warmup, "warmup", 500*time.Millisecond, "unmeasured time before each throughput run")
	fs.IntVar(&c.queueBytes, "queue-bytes", 1<<20, "the channels' overflow.queueBytes (the Channel default is 1 MiB)")
	fs.IntVar(&c.window, "window", 16<<20, "most bytes the sender keeps in flight")
	fs.IntVar(&c.rttSamples, "rtt-samples", 10000, "round trips measured per target and size")
	fs.IntVar(&c.rttWarmup, "rtt-warmup", 1000, "round trips before measuring")
	fs.DurationVar(&c.rttLimit, "rtt-limit", 60*time.Second, "time bound of one latency run")
	fs.Float64Var(&c.overloadFactor, "overload-factor", 10, "open-loop rate as a multiple of podipc's median 64 B rate (0 skips the run)")
	fs.DurationVar(&c.overloadDuration, "overload-duration", 5*time.Second, "length of the overload run")
	fs.StringVar(&c.addrA, "addr-a", "127.0.0.2", "sidecar A's address (app, peer, admin)")
	fs.StringVar(&c.addrB, "addr-b", "127.0.0.3", "sidecar B's address")
	fs.StringVar(&c.mtlsA, "mtls-addr-a", "127.0.0.7", "sidecar A's address in the podipc-mtls target")
	fs.StringVar(&c.mtlsB, "mtls-addr-b", "127.0.0.8", "sidecar B's address in the podipc-mtls target")
	fs.StringVar(&relays, "relay-addrs", "127.0.0.4,127.0.0.5,127.0.0.6", "relay 1, relay 2 and the relay receiver's addresses")
	fs.StringVar(&c.perfDir, "perf-dir", "", "record a CPU profile of the sidecars with perf(1) during podipc's first throughput run at each size, into this directory")
	fs.StringVar(&c.out, "out", "", "also write the Markdown report to this file")
	fs.StringVar(&c.workDir, "work-dir", "", "directory for configs and process logs (default: a new temporary one, removed on success)")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	c.targets = strings.Split(targets, ",")
	c.relayAddrs = strings.Split(relays, ",")
	for _, s := range strings.Split(sizes, ",") {
		n, err := strconv.Atoi(s)
		if err != nil || n < minSize || n > ioBufSize {
			err = fmt.Errorf("-sizes: %q is not a size in [%d, %d]", s, minSize, ioBufSize)
			fmt.Fprintln(os.Stderr, err)
			return c, err
		}
		c.sizes = append(c.sizes, n)
	}
	if len(c.relayAddrs) != 3 || c.runs < 1 || c.rttSamples < 100 {
		err := errors.New("-relay-addrs needs 3 addresses, -runs ≥ 1, -rtt-samples ≥ 100")
		fmt.Fprintln(os.Stderr, err)
		return c, err
	}
	return c, nil
}

// results holds everything measured, for the report.
type results struct {
	cfg     config
	order   []string
	machine machine
	thr     map[string]map[int][]throughputResult // target → size → runs
	rtt     map[string]map[int]rttResult
	rss     map[string]rssFigures
	over    []*overloadFigures
	loadEnd [3]float64
}

// rssFigures are a target's forwarding processes' RSS in bytes, per process.
type rssFigures struct {
	names      []string
	idle, peak []int64
}

// overloadFigures is what one overload run reports.
type overloadFigures struct {
	size                 int
	slowReader           bool
	res                  overloadResult
	idle, peak, after    []int64
	late                 []int64 // peak in the second half of the run
	dropsBefore, dropsAt map[string]float64
	err                  error
}

func run(ctx context.Context, cfg config) error {
	dir, err := workDir(cfg.workDir, "podipc-loadtest-")
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	r := &results{
		cfg: cfg, machine: describeMachine(),
		thr: map[string]map[int][]throughputResult{}, rtt: map[string]map[int]rttResult{},
		rss: map[string]rssFigures{},
	}
	targets := map[string]*target{}
	defer func() {
		for _, t := range targets {
			t.stop()
		}
	}()
	for _, name := range cfg.targets {
		var t *target
		var err error
		switch name {
		case "podipc":
			t, err = setupPodipc(ctx, dir, name, cfg.sidecar, cfg.addrA, cfg.addrB, cfg.queueBytes, plainArgs, strings.Fields(cfg.sidecarArgs))
		case "podipc-mtls":
			t, err = setupPodipc(ctx, dir, name, cfg.sidecar, cfg.mtlsA, cfg.mtlsB, cfg.queueBytes, mtlsArgs, strings.Fields(cfg.sidecarArgs))
		case "relay":
			t, err = setupRelay(ctx, dir, self, cfg.relayAddrs[0], cfg.relayAddrs[1], cfg.relayAddrs[2], benchPort)
		case "nats":
			t, err = setupNATS(ctx, dir, cfg.natsServer, "127.0.0.1")
		default:
			err = fmt.Errorf("unknown target %q", name)
		}
		if err != nil {
			return fmt.Errorf("%s: %w (logs in %s)", name, err, dir)
		}
		targets[name] = t
		r.order = append(r.order, name)
	}
	// Idle RSS: after a settling second with no traffic.
	time.Sleep(time.Second)
	for _, name := range r.order {
		t := targets[name]
		f := rssFigures{}
		for _, p := range t.procs {
			rss, _ := rssBytes(p.pid())
			f.names = append(f.names, p.name)
			f.idle = append(f.idle, rss)
		}
		r.rss[name] = f
	}

	if err := runAll(ctx, r, targets); err != nil {
		return fmt.Errorf("%w (logs in %s)", err, dir)
	}
	if t := targets["podipc"]; t != nil && cfg.overloadFactor > 0 {
		for _, size := range cfg.sizes {
			for _, slow := range []bool{false, true} {
				r.over = append(r.over, runOverload(ctx, r, t, size, slow))
			}
		}
	}
	r.loadEnd = loadAvg()

	w, closeOut, err := reportWriter(cfg.out)
	if err != nil {
		return err
	}
	defer closeOut()
	writeReport(w, r)
	if cfg.workDir == "" {
		for _, t := range targets {
			t.stop()
		}
		targets = nil
		_ = os.RemoveAll(dir)
	}
	for _, o := range r.over {
		if o.err != nil {
			return fmt.Errorf("overload run, %d B: %w", o.size, o.err)
		}
	}
	return nil
}

// runAll takes the throughput and latency figures, interleaving the targets run by run.
func runAll(ctx context.Context, r *results, targets map[string]*target) error {
	cfg := r.cfg
	var pids []int
	for _, name := range r.order {
		for _, p := range targets[name].procs {
			pids = append(pids, p.pid())
		}
	}
	sampler := sampleRSS(pids, 100*time.Millisecond)
	defer func() {
		peaks := sampler.stop()
		for _, name := range r.order {
			f := r.rss[name]
			f.peak = nil
			for _, p := range targets[name].procs {
				f.peak = append(f.peak, peaks[p.pid()])
			}
			r.rss[name] = f
		}
	}()
	for _, size := range cfg.sizes {
		for run := range cfg.runs {
			for _, name := range r.order {
				if err := ctx.Err(); err != nil {
					return err
				}
				t := targets[name]
				var prof *proc
				if name == "podipc" && run == 0 && cfg.perfDir != "" {
					prof = startPerf(ctx, cfg.perfDir, t, size, cfg.warmup, cfg.duration)
				}
				res, err := measureThroughput(ctx, t.open, t.usage, nil, size, cfg.warmup, cfg.duration, cfg.window)
				if prof != nil {
					<-prof.done
				}
				if err == nil {
					err = t.alive()
				}
				if err != nil {
					return fmt.Errorf("%s throughput, %d B, run %d: %w", name, size, run+1, err)
				}
				if r.thr[name] == nil {
					r.thr[name] = map[int][]throughputResult{}
				}
				r.thr[name][size] = append(r.thr[name][size], res)
				fmt.Fprintf(os.Stderr, "throughput %-6s %5d B run %d: %10.0f lines/s (%d lines checked)\n", name, size, run+1, res.rate, res.received)
			}
		}
		for _, name := range r.order {
			t := targets[name]
			res, err := measureRTT(ctx, t.open, size, cfg.rttWarmup, cfg.rttSamples, cfg.rttLimit)
			if err == nil {
				err = t.alive()
			}
			if err != nil {
				return fmt.Errorf("%s latency, %d B: %w", name, size, err)
			}
			if r.rtt[name] == nil {
				r.rtt[name] = map[int]rttResult{}
			}
			r.rtt[name][size] = res
			fmt.Fprintf(os.Stderr, "latency    %-6s %5d B: p50 %v p99 %v max %v (%d samples)\n", name, size, res.p50, res.p99, res.max, res.samples)
		}
	}
	return nil
}

// runOverload overloads podipc's lossy channel by overloadFactor, sampling the sidecars'
// RSS: either the sending app writes open loop at overloadFactor times podipc's median
// closed-loop rate at size, or (slowReader) it writes at that rate and the receiving app
// reads overloadFactor times more slowly.
func runOverload(ctx context.Context, r *results, t *target, size int, slowReader bool) *overloadFigures {
	cfg := r.cfg
	o := &overloadFigures{size: size, slowReader: slowReader}
	base := median(rates(r.thr["podipc"][size]))
	rate, readRate := cfg.overloadFactor*base, 0.0
	if slowReader {
		rate, readRate = base, base/cfg.overloadFactor
	}
	for _, p := range t.procs {
		rss, _ := rssBytes(p.pid())
		o.idle = append(o.idle, rss)
	}
	// Drops are counted from the sync on (a sync line can be counted no_connection).
	synced := func() error {
		o.dropsBefore = scrapeAll(ctx, t.metrics)
		return nil
	}
	pids := make([]int, 0, len(t.procs))
	for _, p := range t.procs {
		pids = append(pids, p.pid())
	}
	// The split is a rough half-time mark (the path sync comes first): RSS still growing in
	// the second half of the run would show as a late peak above the overall early one.
	s := sampleRSSSplit(pids, 50*time.Millisecond, time.Now().Add(cfg.overloadDuration/2))
	o.res, o.err = measureOverload(ctx, t.openFlood, synced, size, rate, readRate, cfg.overloadDuration)
	peaks := s.stop()
	for _, p := range t.procs {
		o.peak = append(o.peak, peaks[p.pid()])
		o.late = append(o.late, s.late[p.pid()])
	}
	if o.err == nil {
		o.err = t.alive()
	}
	o.dropsAt = scrapeAll(ctx, t.metrics)
	time.Sleep(2 * time.Second)
	for _, p := range t.procs {
		rss, _ := rssBytes(p.pid())
		o.after = append(o.after, rss)
	}
	fmt.Fprintf(os.Stderr, "overload %5d B slow reader %-5v: offered %.0f lines/s, wrote %.0f, sent %d, received %d, err %v\n",
		size, slowReader, o.res.offered, o.res.achieved, o.res.sent, o.res.received, o.err)
	return o
}

// scrapeAll merges the drop counters of several /metrics pages, prefixing each series
// with the sidecar it came from.
func scrapeAll(ctx context.Context, urls []string) map[string]float64 {
	out := map[string]float64{}
	for i, u := range urls {
		m, err := scrapeDrops(ctx, u)
		if err != nil {
			out[fmt.Sprintf("sidecar %c: scrape error: %v", 'A'+i, err)] = -1
			continue
		}
		for k, v := range m {
			out[fmt.Sprintf("sidecar %c %s", 'A'+i, k)] = v
		}
	}
	return out
}

// startPerf records the sidecars' CPU with perf for the measured part of a throughput run
// (it starts now, sleeps through the warm-up, and stops after dur). A failure to start is
// reported and the run goes on without a profile.
func startPerf(ctx context.Context, dir string, t *target, size int, warmup, dur time.Duration) *proc {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "perf:", err)
		return nil
	}
	var pids []string
	for _, p := range t.procs {
		pids = append(pids, strconv.Itoa(p.pid()))
	}
	out := filepath.Join(dir, fmt.Sprintf("sidecars-%dB.perf.data", size))
	script := fmt.Sprintf("sleep %f && exec perf record -F 999 -g -p %s -o %s -- sleep %f",
		warmup.Seconds(), strings.Join(pids, ","), out, dur.Seconds())
	p, err := startProc(ctx, dir, fmt.Sprintf("perf-%dB", size), nil, "/bin/sh", "-c", script)
	if err != nil {
		fmt.Fprintln(os.Stderr, "perf:", err)
		return nil
	}
	fmt.Fprintf(os.Stderr, "perf: recording the sidecars into %s (perf report -i %s)\n", out, out)
	return p
}

// workDir returns dir, created if need be, or a new temporary directory named after
// pattern when dir is empty: where the processes of a run keep their files and logs.
func workDir(dir, pattern string) (string, error) {
	if dir == "" {
		return os.MkdirTemp("", pattern)
	}
	return dir, os.MkdirAll(dir, 0o755)
}
