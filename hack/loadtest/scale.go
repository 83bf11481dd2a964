package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// `loadtest scale` measures how podipc's cost grows with the number of members of one
// channel, next to nats-server fanning the same lines out to as many subscribers, in the
// same run. For each N it starts N member sidecars in static mode on distinct loopback
// addresses and measures:
//
//   - Broadcast: one sending app on member 0, one receiving app on each other member,
//     closed loop as fast as the slowest receiver allows (every line checked at every
//     receiver); NATS: one publisher, N−1 subscribers of one subject.
//   - all-to-all: one app per member sending rate lines/s open loop and reading every
//     other member's lines; NATS: one connection per member, publishing to and
//     subscribing to one subject (without echo).
//   - the sidecars' idle RSS, N−1 peer links each.

// scaleConfig holds the flags of `loadtest scale`.
type scaleConfig struct {
	sidecar, natsServer string
	sidecarArgs         []string
	members             []int
	sizes               []int
	duration, warmup    time.Duration
	settle              time.Duration
	window              int
	queueBytes          int
	a2aRate             float64
	a2aDuration         time.Duration
	overloadFactor      float64
	overloadDuration    time.Duration
	overloadSize        int
	memoryLimit         string
	net                 string
	natsAddr            string
	out, svgDir         string
	workDir             string
}

func parseScaleFlags(args []string) (scaleConfig, error) {
	var c scaleConfig
	var members, sizes, extra string
	fs := flag.NewFlagSet("loadtest scale", flag.ContinueOnError)
	fs.StringVar(&c.sidecar, "sidecar", "bin/podipc-sidecar", "podipc sidecar binary")
	fs.StringVar(&extra, "sidecar-args", "", "extra sidecar flags, space-separated")
	fs.StringVar(&c.natsServer, "nats-server", "bin/nats-server", "nats-server binary")
	fs.StringVar(&members, "members", "2,4,8,16,32,64", "channel sizes N to measure")
	fs.StringVar(&sizes, "sizes", "64,1024", "line sizes in bytes, '\\n' included")
	fs.DurationVar(&c.duration, "duration", 3*time.Second, "measured time of one Broadcast run")
	fs.DurationVar(&c.warmup, "warmup", 500*time.Millisecond, "unmeasured time before each Broadcast run")
	fs.DurationVar(&c.settle, "settle", 2*time.Second, "wait after the sidecars are ready and all their peer links up before the idle RSS is read")
	fs.IntVar(&c.window, "window", 1<<20, "most bytes the sender keeps in flight ahead of the slowest receiver")
	fs.IntVar(&c.queueBytes, "queue-bytes", 1<<20, "the channels' overflow.queueBytes (the Channel default is 1 MiB)")
	fs.Float64Var(&c.a2aRate, "all-to-all-rate", 1000, "lines/s each member sends in the all-to-all run (0 skips it)")
	fs.DurationVar(&c.a2aDuration, "all-to-all-duration", 3*time.Second, "length of the all-to-all run")
	fs.Float64Var(&c.overloadFactor, "overload-factor", 10, "the overload run floods at this multiple of the closed-loop Broadcast rate at -overload-size (0 skips it)")
	fs.DurationVar(&c.overloadDuration, "overload-duration", 3*time.Second, "length of the overload run")
	fs.IntVar(&c.overloadSize, "overload-size", 1024, "line size of the overload run; one of -sizes")
	fs.StringVar(&c.memoryLimit, "memory-limit", "128Mi", "the sidecars' --memory-limit in the overload run (the chart's default container limit)")
	fs.StringVar(&c.net, "net", "127.77.0", "first three octets of the sidecars' loopback addresses (member i is .i+1)")
	fs.StringVar(&c.natsAddr, "nats-addr", "127.0.0.1", "nats-server's loopback address")
	fs.StringVar(&c.out, "out", "", "also write the Markdown report to this file")
	fs.StringVar(&c.svgDir, "svg-dir", "", "write the plots (SVG) into this directory")
	fs.StringVar(&c.workDir, "work-dir", "", "directory for configs and process logs (default: a new temporary one, removed on success)")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	c.sidecarArgs = strings.Fields(extra)
	fail := func(err error) (scaleConfig, error) {
		fmt.Fprintln(os.Stderr, err)
		return c, err
	}
	for _, s := range strings.Split(members, ",") {
		n, err := strconv.Atoi(s)
		if err != nil || n < 2 || n > 250 {
			return fail(fmt.Errorf("-members: %q is not a channel size in [2, 250]", s))
		}
		c.members = append(c.members, n)
	}
	for _, s := range strings.Split(sizes, ",") {
		n, err := strconv.Atoi(s)
		if err != nil || n < minSize || n > ioBufSize {
			return fail(fmt.Errorf("-sizes: %q is not a size in [%d, %d]", s, minSize, ioBufSize))
		}
		c.sizes = append(c.sizes, n)
	}
	if c.overloadFactor > 0 && !slices.Contains(c.sizes, c.overloadSize) {
		return fail(fmt.Errorf("-overload-size %d is not one of -sizes", c.overloadSize))
	}
	if strings.Count(c.net, ".") != 2 || !strings.HasPrefix(c.net, "127.") {
		return fail(fmt.Errorf("-net: %q is not three octets of a loopback address (127.x.y)", c.net))
	}
	return c, nil
}

// scalePoint is everything measured at one channel size N.
type scalePoint struct {
	n int
	// idle is each sidecar's RSS after settling: N−1 peer links each, no traffic.
	idle []int64
	// idleHeap is the sending sidecar's Go heap in use then (go_memstats_heap_inuse_bytes):
	// buffers allocated but never touched count here and not in RSS.
	idleHeap float64
	// bcast holds the Broadcast runs by target ("podipc", "nats") and size.
	bcast map[string]map[int]*bcastFigures
	// a2a holds the all-to-all runs by target.
	a2a map[string]*a2aFigures
	// over is the overload run (podipc only), nil if skipped.
	over *scaleOverload
}

// bcastFigures is one Broadcast run at one N and size.
type bcastFigures struct {
	res        throughputResult
	idle, peak int64 // RSS of the sending sidecar (or nats-server)
	lost       float64
}

// a2aFigures is one all-to-all run.
type a2aFigures struct {
	res  allToAllResult
	used usage
	peak int64 // highest RSS of any forwarding process
	lost float64
}

func runScale(ctx context.Context, cfg scaleConfig) error {
	dir, err := workDir(cfg.workDir, "podipc-loadtest-scale-")
	if err != nil {
		return err
	}
	m := describeMachine()
	nats, err := setupNATS(ctx, dir, cfg.natsServer, cfg.natsAddr)
	if err != nil {
		return fmt.Errorf("nats: %w (logs in %s)", err, dir)
	}
	defer nats.stop()
	var points []*scalePoint
	for _, n := range cfg.members {
		p, err := measurePoint(ctx, cfg, filepath.Join(dir, fmt.Sprintf("n%d", n)), n, nats)
		if err != nil {
			return fmt.Errorf("at %d members: %w (logs in %s)", n, err, dir)
		}
		points = append(points, p)
	}
	loadEnd := loadAvg()

	w, closeOut, err := reportWriter(cfg.out)
	if err != nil {
		return err
	}
	defer closeOut()
	writeScaleReport(w, cfg, m, loadEnd, points)
	if cfg.svgDir != "" {
		if err := writeScalePlots(cfg.svgDir, cfg, points); err != nil {
			return err
		}
	}
	if cfg.workDir == "" {
		nats.stop()
		_ = os.RemoveAll(dir)
	}
	return nil
}

// measurePoint starts N sidecars, measures them and NATS at N, and stops them.
func measurePoint(ctx context.Context, cfg scaleConfig, dir string, n int, nats *target) (*scalePoint, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	ms := make([]member, n)
	for i := range ms {
		ms[i] = member{pod: fmt.Sprintf("pod-%02d", i), uid: fmt.Sprintf("uid-%02d", i), ip: fmt.Sprintf("%s.%d", cfg.net, i+1)}
	}
	t, err := startSidecars(ctx, dir, "podipc", cfg.sidecar, ms, cfg.queueBytes, plainArgs, cfg.sidecarArgs)
	if err != nil {
		return nil, err
	}
	defer t.stop()
	if err := waitLinksUp(ctx, ms, n-1); err != nil {
		return nil, err
	}
	time.Sleep(cfg.settle)
	pt := &scalePoint{n: n, bcast: map[string]map[int]*bcastFigures{"podipc": {}, "nats": {}}, a2a: map[string]*a2aFigures{}}
	for _, p := range t.procs {
		rss, _ := rssBytes(p.pid())
		pt.idle = append(pt.idle, rss)
	}
	heap, err := scrapeMetrics(ctx, t.metrics[0], func(name string) bool { return name == "go_memstats_heap_inuse_bytes" })
	if err != nil {
		return nil, err
	}
	pt.idleHeap = heap["go_memstats_heap_inuse_bytes"]
	fmt.Fprintf(os.Stderr, "scale N=%-3d idle RSS: sending sidecar %s (heap in use %s), median sidecar %s (%d peer links each)\n",
		n, mb(pt.idle[0]), mb(int64(pt.idleHeap)), mb(int64(median(floats(pt.idle)))), n-1)

	var rx []string
	for _, m := range ms[1:] {
		rx = append(rx, hostPort(m.ip, benchPort))
	}
	podipcOpen := func(ctx context.Context) (path, error) { return dialBoth(ctx, hostPort(ms[0].ip, benchPort), rx...) }
	natsOpen := func(context.Context) (path, error) { return openNATS(nats.url, n-1) }
	// podipc and NATS alternate size by size, so a change in the machine's load hits both.
	for _, size := range cfg.sizes {
		for _, name := range []string{"podipc", "nats"} {
			tg, open := t, podipcOpen
			if name == "nats" {
				tg, open = nats, natsOpen
			}
			f, err := measureBroadcast(ctx, cfg, tg, open, size)
			if err != nil {
				return nil, fmt.Errorf("%s Broadcast, %d B: %w", name, size, err)
			}
			pt.bcast[name][size] = f
			fmt.Fprintf(os.Stderr, "scale N=%-3d %-6s %5d B: %10.0f lines/s aggregate, %10.0f to the slowest receiver, lost %.0f\n",
				n, name, size, f.res.rate, f.res.slowest, f.lost)
		}
	}
	if cfg.a2aRate > 0 {
		size := cfg.sizes[0]
		for _, name := range []string{"podipc", "nats"} {
			f, err := measureA2A(ctx, cfg, name, t, nats, ms, size)
			if err != nil {
				return nil, fmt.Errorf("%s all-to-all: %w", name, err)
			}
			pt.a2a[name] = f
			fmt.Fprintf(os.Stderr, "scale N=%-3d %-6s all-to-all: apps wrote %.0f lines/s of %.0f; %.0f delivered of %.0f offered, %s behind, lost %.0f\n",
				n, name, f.res.written, float64(n)*cfg.a2aRate, f.res.delivered, f.res.expected, f.res.drain.Round(time.Millisecond), f.lost)
		}
	}
	if cfg.overloadFactor > 0 {
		t.stop() // the overload run starts the members again, with a memory limit
		rate := cfg.overloadFactor * pt.bcast["podipc"][cfg.overloadSize].res.slowest
		o, err := measureScaleOverload(ctx, cfg, overloadDir(dir), ms, cfg.overloadSize, rate, 0, dialApps)
		if err != nil {
			return nil, fmt.Errorf("overload: %w", err)
		}
		pt.over = o
		fmt.Fprintf(os.Stderr, "scale N=%-3d overload: offered %.0f lines/s, wrote %.0f, delivered %.0f; sending sidecar RSS %s → %s, memory used peak %s of a %s budget; dropped %v, lost without a count %.0f\n",
			n, o.res.offered, o.res.achieved, o.res.rate, mb(o.idle), mb(o.peak), mb(int64(o.usedPeak)), mb(int64(o.budget)), o.dropped, o.lost())
	}
	return pt, nil
}

// measureBroadcast runs one closed-loop Broadcast run, sampling the RSS of the sending
// sidecar (the target's first process) and counting the drops the sidecars report.
func measureBroadcast(ctx context.Context, cfg scaleConfig, t *target, open opener, size int) (*bcastFigures, error) {
	pid := t.procs[0].pid()
	f := &bcastFigures{}
	f.idle, _ = rssBytes(pid)
	var before dropCounts
	synced := func() (err error) {
		before, err = readDrops(ctx, t.metrics)
		return err
	}
	s := sampleRSS([]int{pid}, 50*time.Millisecond)
	res, err := measureThroughput(ctx, open, t.usage, synced, size, cfg.warmup, cfg.duration, cfg.window)
	f.res, f.peak = res, s.stop()[pid]
	if err == nil {
		err = t.alive()
	}
	if err != nil {
		return nil, err
	}
	after, err := readDrops(ctx, t.metrics)
	if err != nil {
		return nil, err
	}
	var moved []string
	if f.lost, moved = after.since(before); f.lost != 0 {
		return nil, fmt.Errorf("%.0f lines counted as dropped on a Block channel: %s", f.lost, strings.Join(moved, ", "))
	}
	return f, nil
}

// measureA2A runs the all-to-all load on podipc's N sidecars or on nats-server.
func measureA2A(ctx context.Context, cfg scaleConfig, name string, t, nats *target, ms []member, size int) (*a2aFigures, error) {
	tg := t
	open := func(ctx context.Context, i int) (path, error) { return dialApp(ctx, hostPort(ms[i].ip, benchPort)) }
	if name == "nats" {
		tg = nats
		subject := fmt.Sprintf("a2a.%d", natsRun.Add(1))
		open = func(_ context.Context, _ int) (path, error) { return openNATSMember(nats.url, subject) }
	}
	pids := make([]int, 0, len(tg.procs))
	for _, p := range tg.procs {
		pids = append(pids, p.pid())
	}
	var before dropCounts
	var u0 usage
	synced := func() (err error) {
		before, err = readDrops(ctx, tg.metrics)
		u0 = tg.usage()
		return err
	}
	f := &a2aFigures{}
	s := sampleRSS(pids, 50*time.Millisecond)
	res, err := measureAllToAll(ctx, open, synced, len(ms), size, cfg.a2aRate, cfg.a2aDuration)
	u1 := tg.usage()
	f.res = res
	for _, v := range s.stop() {
		f.peak = max(f.peak, v)
	}
	if err == nil {
		err = tg.alive()
	}
	if err != nil {
		return nil, err
	}
	after, err := readDrops(ctx, tg.metrics)
	if err != nil {
		return nil, err
	}
	f.used = usage{cpu: u1.cpu - u0.cpu, syscalls: u1.syscalls - u0.syscalls, sender: u1.sender - u0.sender}
	counted, moved := after.since(before)
	if f.lost = counted + float64(f.res.missing); f.lost != 0 {
		return nil, fmt.Errorf("%.0f lines lost: %d never arrived; counted drops: %s", f.lost, f.res.missing, strings.Join(moved, ", "))
	}
	return f, nil
}

// dropCounts reads every drop counter of the sidecars' /metrics pages, by sidecar and
// series (see scrapeAll).
type dropCounts map[string]float64

func readDrops(ctx context.Context, urls []string) (dropCounts, error) {
	out := dropCounts{}
	for i, u := range urls {
		m, err := scrapeDrops(ctx, u)
		if err != nil {
			return nil, err
		}
		for k, v := range m {
			out[fmt.Sprintf("sidecar %d %s", i, k)] = v
		}
	}
	return out, nil
}

// since returns the lines counted as dropped since before, and the series that moved.
func (d dropCounts) since(before dropCounts) (float64, []string) {
	var n float64
	var moved []string
	for k, v := range d {
		if dv := v - before[k]; dv != 0 {
			n += dv
			moved = append(moved, fmt.Sprintf("%s +%.0f", k, dv))
		}
	}
	slices.Sort(moved)
	return n, moved
}

func floats(xs []int64) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = float64(x)
	}
	return out
}

// waitLinksUp waits until every member has links to all its peers: its outbound peer links
// TCP connections established (from /proc/net/tcp, so the sidecars themselves are not
// touched: a scrape of /metrics would add its own buffers to the idle RSS). A sidecar is
// ready before its outbound links have all connected, and "idle with N−1 links" means with
// all of them; settle then covers the handshakes on top.
func waitLinksUp(ctx context.Context, ms []member, links int) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		up, err := outboundLinks()
		if err != nil {
			return err
		}
		short := ""
		for _, m := range ms {
			if up[m.ip] < links {
				short = fmt.Sprintf("%s has %d of %d outbound peer links", m.pod, up[m.ip], links)
				break
			}
		}
		if short == "" {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("after a minute: %s", short)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// outboundLinks counts, per local IPv4 address, the established TCP connections to a remote
// peer port (7701).
func outboundLinks() (map[string]int, error) {
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return nil, err
	}
	out := map[string]int{}
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		// sl local_address rem_address st …; addresses are hex IP:port, the IP little-endian.
		if len(f) < 4 || f[3] != "01" {
			continue
		}
		local, remote := f[1], f[2]
		if !strings.HasSuffix(remote, fmt.Sprintf(":%04X", peerPort)) || len(local) < 8 {
			continue
		}
		ip, err := strconv.ParseUint(local[:8], 16, 32)
		if err != nil {
			continue
		}
		out[fmt.Sprintf("%d.%d.%d.%d", ip&0xff, ip>>8&0xff, ip>>16&0xff, ip>>24)]++
	}
	return out, nil
}
