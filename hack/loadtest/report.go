package main

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"
)

// machine describes where the figures were taken.
type machine struct {
	cpu, kernel string
	cores       int
	loadStart   [3]float64
	started     time.Time
}

func describeMachine() machine {
	m := machine{cores: runtime.NumCPU(), loadStart: loadAvg(), started: time.Now(), cpu: "unknown CPU"}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.kernel = strings.TrimSpace(string(b))
	}
	return m
}

func loadAvg() [3]float64 {
	var l [3]float64
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return l
	}
	f := strings.Fields(string(b))
	for i := 0; i < 3 && i < len(f); i++ {
		l[i], _ = strconv.ParseFloat(f[i], 64)
	}
	return l
}

func rates(rs []throughputResult) []float64 {
	out := make([]float64, len(rs))
	for i, r := range rs {
		out[i] = r.rate
	}
	return out
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// Display names of the targets, in report order.
var display = map[string]string{"podipc": "podipc", "podipc-mtls": "podipc mTLS", "relay": "TCP relay", "nats": "NATS"}

func writeReport(w io.Writer, r *results) {
	cfg := r.cfg
	p := func(format string, a ...any) { _, _ = fmt.Fprintf(w, format, a...) }
	p("Taken %s with `loadtest %s`.\n\n", r.machine.started.UTC().Format("2006-01-02 15:04 MST"), strings.Join(os.Args[1:], " "))
	p("Machine: %s, %d logical CPUs, Linux %s, %s. Load average (1, 5, 15 min) %.2f %.2f %.2f at the start, %.2f %.2f %.2f at the end.\n\n",
		r.machine.cpu, r.machine.cores, r.machine.kernel, runtime.Version(),
		r.machine.loadStart[0], r.machine.loadStart[1], r.machine.loadStart[2], r.loadEnd[0], r.loadEnd[1], r.loadEnd[2])

	has := func(name string) bool { return slices.Contains(r.order, name) }
	cols := []string{}
	for _, n := range []string{"podipc", "podipc-mtls", "relay", "nats"} {
		if has(n) {
			cols = append(cols, n)
		}
	}
	header := func(first string, extra ...string) {
		p("| %s |", first)
		for _, c := range cols {
			p(" %s |", display[c])
		}
		for _, e := range extra {
			p(" %s |", e)
		}
		p("\n|---|")
		for range len(cols) + len(extra) {
			p("---:|")
		}
		p("\n")
	}
	ratio := func(a, b float64) string {
		if a == 0 || b == 0 {
			return "–"
		}
		return fmt.Sprintf("%.2f", a/b)
	}
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "**not met**"
	}
	both := has("podipc") && has("relay") && has("nats")

	p("### Throughput\n\nLines per second read by the receiving app from one sending app, closed loop (the sender writes as fast as the path accepts, at most %d MiB in flight); median of %d runs of %s after %s warm-up, [slowest–fastest]. Every line is checked: any loss or reordering fails the run.\n\n",
		cfg.window>>20, cfg.runs, cfg.duration, cfg.warmup)
	header("line size", "podipc / relay", "podipc / NATS", "goal: ≥ 0.5× relay and > NATS")
	for _, size := range cfg.sizes {
		p("| %s |", sizeName(size))
		med := map[string]float64{}
		for _, c := range cols {
			rs := rates(r.thr[c][size])
			med[c] = median(rs)
			p(" %s [%s–%s] |", si(med[c]), si(slices.Min(rs)), si(slices.Max(rs)))
		}
		p(" %s | %s |", ratio(med["podipc"], med["relay"]), ratio(med["podipc"], med["nats"]))
		if both {
			p(" %s |\n", verdict(med["podipc"] >= 0.5*med["relay"] && med["podipc"] > med["nats"]))
		} else {
			p(" – |\n")
		}
	}

	p("\nWhat the forwarding processes (both sidecars; both relays; nats-server) used per line carried, over the measured windows of all runs: CPU time, and read plus write system calls (from /proc/<pid>/io; fewer means better batching):\n\n")
	header("line size, per line")
	for _, size := range cfg.sizes {
		for _, what := range []string{"CPU", "syscalls"} {
			p("| %s, %s |", sizeName(size), what)
			for _, c := range cols {
				var u usage
				var lines float64
				for _, t := range r.thr[c][size] {
					u.cpu += t.used.cpu
					u.syscalls += t.used.syscalls
					lines += t.rate * cfg.duration.Seconds()
				}
				if what == "CPU" {
					p(" %.2f µs |", u.cpu/lines*1e6)
				} else {
					p(" %.3f |", u.syscalls/lines)
				}
			}
			p("\n")
		}
	}

	p("\n### Round-trip latency\n\nOne line outstanding: the sending app writes a line and waits for the receiving app's echo (podipc: sender → A → B → receiver → B → A → sender; the relay likewise; NATS: publisher → server → subscriber, echoed back through the server). %d round trips measured after %d unmeasured.\n\n",
		cfg.rttSamples, cfg.rttWarmup)
	header("line size, quantile", "podipc / relay", "podipc / NATS", "goal: p50 ≤ 1.5×, p99 ≤ 2× relay")
	for _, size := range cfg.sizes {
		for _, q := range []string{"p50", "p99"} {
			get := func(c string) time.Duration {
				if q == "p50" {
					return r.rtt[c][size].p50
				}
				return r.rtt[c][size].p99
			}
			p("| %s, %s |", sizeName(size), q)
			for _, c := range cols {
				p(" %s |", us(get(c)))
			}
			a, b, n := float64(get("podipc")), float64(get("relay")), float64(get("nats"))
			p(" %s | %s |", ratio(a, b), ratio(a, n))
			limit := 1.5
			if q == "p99" {
				limit = 2
			}
			if has("podipc") && has("relay") {
				p(" %s |\n", verdict(a <= limit*b))
			} else {
				p(" – |\n")
			}
		}
	}

	p("\n### Memory\n\nVmRSS of each forwarding process (from /proc/<pid>/status; MB = 10⁶ bytes): idle after start-up, and the peak sampled every 100 ms through all the runs above. Goal: a sidecar ≤ 15 MB idle in static mode.\n\n")
	p("| process | idle | peak under load | goal |\n|---|---:|---:|---:|\n")
	for _, c := range cols {
		f := r.rss[c]
		for i, n := range f.names {
			goal := "–"
			if c == "podipc" {
				goal = verdict(f.idle[i] <= 15e6)
			}
			p("| %s `%s` | %s | %s | %s |\n", display[c], n, mb(f.idle[i]), mb(f.peak[i]), goal)
		}
	}

	if len(r.over) > 0 {
		writeOverload(w, r)
	}
}

func writeOverload(w io.Writer, r *results) {
	p := func(format string, a ...any) { _, _ = fmt.Fprintf(w, format, a...) }
	p("\n### Overload\n\nOpen loop on channel `flood` (`WaitThenDrop`, %[3]s queues, 100 ms wait), %[1]s per run, then the receiving app drains. *Fast reader*: the sending app writes lines on schedule at %.0[2]f× podipc's median closed-loop rate at that size. *Slow reader*: it writes at that median rate, and the receiving app reads %.0[2]f× more slowly. Lines may be dropped, but each lost line must be counted in `podipc_dropped_lines_total`, and a sequence number going backwards still fails the run. When the sidecar reads from the app more slowly than the schedule, the app's writes block (TCP backpressure) and it writes less than offered.\n\n",
		r.cfg.overloadDuration, r.cfg.overloadFactor, sizeName(r.cfg.queueBytes))
	p("| run | offered | written by the app | read by the receiving app | lines sent | received | lost | drops counted |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, o := range r.over {
		res := o.res
		p("| %s | %s/s | %s/s | %s/s | %d | %d | %d | %.0f |\n", o.name(), si(res.offered), si(res.achieved), si(res.rate),
			res.sent, res.received, int64(res.sent)-int64(res.received), o.counted())
	}
	p("\n")
	for _, o := range r.over {
		if o.err != nil {
			p("**The %s run failed:** %v\n\n", o.name(), o.err)
		}
		if lost := float64(int64(o.res.sent) - int64(o.res.received)); lost != o.counted() {
			p("**%s: %.0f lost lines are not accounted for by the drop counters.**\n\n", o.name(), lost-o.counted())
		}
	}
	p("VmRSS of the sidecars (MB = 10⁶ bytes), sampled every 50 ms:\n\n")
	p("| run | sidecar | before | peak, whole run | peak, second half | 2 s after |\n|---|---|---:|---:|---:|---:|\n")
	for _, o := range r.over {
		for i, n := range r.rss["podipc"].names {
			p("| %s | `%s` | %s | %s | %s | %s |\n", o.name(), n, mb(o.idle[i]), mb(o.peak[i]), mb(o.late[i]), mb(o.after[i]))
		}
	}
	p("\nDrop counters that changed (all series with `drop` in the name; before → after):\n\n")
	changed := false
	for _, o := range r.over {
		keys := make([]string, 0, len(o.dropsAt))
		for k := range o.dropsAt {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			if o.dropsAt[k] != o.dropsBefore[k] {
				p("- %s: `%s`: %.0f → %.0f\n", o.name(), k, o.dropsBefore[k], o.dropsAt[k])
				changed = true
			}
		}
	}
	if !changed {
		p("- none\n")
	}
}

func (o *overloadFigures) name() string {
	if o.slowReader {
		return sizeName(o.size) + ", slow reader"
	}
	return sizeName(o.size) + ", fast reader"
}

// counted is the drops of channel flood counted during the run, on both sidecars.
func (o *overloadFigures) counted() float64 {
	var n float64
	for k, v := range o.dropsAt {
		if strings.Contains(k, `channel="flood"`) {
			n += v - o.dropsBefore[k]
		}
	}
	return n
}

func sizeName(n int) string {
	if n%(1<<20) == 0 {
		return fmt.Sprintf("%d MiB", n>>20)
	}
	if n%1024 == 0 {
		return fmt.Sprintf("%d KiB", n/1024)
	}
	return fmt.Sprintf("%d B", n)
}

// si formats a rate with a k or M suffix and three significant digits.
func si(x float64) string {
	switch {
	case x >= 1e6:
		return fmt.Sprintf("%.3gM", x/1e6)
	case x >= 1e3:
		return fmt.Sprintf("%.3gk", x/1e3)
	default:
		return fmt.Sprintf("%.3g", x)
	}
}

func us(d time.Duration) string { return fmt.Sprintf("%.0f µs", float64(d)/1e3) }

func mb(b int64) string { return fmt.Sprintf("%.1f MB", float64(b)/1e6) }

// reportWriter is where a report goes: standard output, and also the file named by -out when
// one is given. The returned func closes that file.
func reportWriter(out string) (io.Writer, func(), error) {
	if out == "" {
		return os.Stdout, func() {}, nil
	}
	f, err := os.Create(out)
	if err != nil {
		return nil, nil, err
	}
	return io.MultiWriter(os.Stdout, f), func() { _ = f.Close() }, nil
}
