package main

import (
	"cmp"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"
)

// writeScaleReport prints the scale run's figures as Markdown, for docs/performance.md.
func writeScaleReport(w io.Writer, cfg scaleConfig, m machine, loadEnd [3]float64, points []*scalePoint) {
	p := func(format string, a ...any) { _, _ = fmt.Fprintf(w, format, a...) }
	p("Taken %s with `loadtest %s`.\n\n", m.started.UTC().Format("2006-01-02 15:04 MST"), strings.Join(displayArgs(os.Args[1:]), " "))
	p("Machine: %s, %d logical CPUs, Linux %s, %s. Load average (1, 5, 15 min) %.2f %.2f %.2f at the start, %.2f %.2f %.2f at the end.\n\n",
		m.cpu, m.cores, m.kernel, runtime.Version(),
		m.loadStart[0], m.loadStart[1], m.loadStart[2], loadEnd[0], loadEnd[1], loadEnd[2])

	p("#### Broadcast from one member to N−1\n\n")
	p("One sending app on member 0, one receiving app on each other member, closed loop: the sender writes as fast as the slowest receiver allows (at most %s in flight ahead of it); %s measured after %s warm-up. NATS: one publisher, N−1 subscribers of one subject, the same lines. Every line is checked at every receiver (any loss or reorder fails the run) and the sidecars' drop counters must not move (lost). CPU per delivered line: the CPU time of all forwarding processes (all N sidecars; nats-server), and of the sending sidecar alone, over the lines all receivers read. RSS: the sending sidecar's (nats-server's) before the run and its peak during it, sampled every 50 ms.\n\n",
		sizeName(cfg.window), cfg.duration, cfg.warmup)
	for _, size := range cfg.sizes {
		p("%s lines:\n\n", sizeName(size))
		p("| N | podipc lines/s, all receivers | NATS | podipc / NATS | podipc, slowest receiver | NATS | podipc CPU/line, all sidecars | sending sidecar | NATS | sending sidecar RSS idle → peak | nats-server | lost |\n")
		p("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, pt := range points {
			a, b := pt.bcast["podipc"][size], pt.bcast["nats"][size]
			p("| %d | %s | %s | %s | %s | %s | %s | %s | %s | %s → %s | %s → %s | %.0f |\n", pt.n,
				si(a.res.rate), si(b.res.rate), times(a.res.rate, b.res.rate), si(a.res.slowest), si(b.res.slowest),
				nsPerLine(a.res.used.cpu, a.res.rate, cfg.duration), nsPerLine(a.res.used.sender, a.res.rate, cfg.duration),
				nsPerLine(b.res.used.cpu, b.res.rate, cfg.duration),
				mb(a.idle), mb(a.peak), mb(b.idle), mb(b.peak), a.lost+b.lost)
		}
		p("\n")
	}

	if cfg.a2aRate > 0 {
		p("#### All to all\n\nEvery member's app sends %.0f lines/s of %s open loop for %s and reads every other member's lines (podipc: one connection per member; NATS: one connection per member publishing to and subscribing to one subject, without echo). Written: lines/s the apps wrote together (less than N × %.0[1]f when the target pushes back, as a `Block` channel does); delivered: lines/s read by all apps together while the senders ran; behind: how long after the senders stopped the last line arrived (a target that cannot keep up delivers less than offered and catches up afterwards). Every sender's sequence is checked at every receiver; lost counts lines that never arrived plus counted drops. CPU per delivered line is over all forwarding processes and all lines; RSS is the highest peak of any of them.\n\n",
			cfg.a2aRate, sizeName(cfg.sizes[0]), cfg.a2aDuration)
		p("| N | offered to all receivers, lines/s | podipc written | NATS | podipc delivered | NATS | podipc behind | NATS | podipc CPU/line | NATS | podipc peak RSS (highest sidecar) | nats-server | lost |\n")
		p("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, pt := range points {
			a, b := pt.a2a["podipc"], pt.a2a["nats"]
			p("| %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %.0f |\n", pt.n, si(a.res.expected),
				si(a.res.written), si(b.res.written), si(a.res.delivered), si(b.res.delivered),
				a.res.drain.Round(time.Millisecond), b.res.drain.Round(time.Millisecond),
				cpuPerLine(a.used.cpu, a.res.received), cpuPerLine(b.used.cpu, b.res.received),
				mb(a.peak), mb(b.peak), a.lost+b.lost)
		}
		p("\n")
	}

	if cfg.overloadFactor > 0 {
		p("#### Overload under the memory limit\n\nThe N sidecars started again with `--memory-limit=%[1]s` (the chart's default container limit: the Go runtime's soft limit at 90 %% of it, the memory budget at half). The sending app on member 0 floods channel `flood` (`WaitThenDrop`, %[2]s queues, 100 ms wait) open loop for %[3]s at %.0[4]f× the closed-loop Broadcast rate just measured at %[5]s, and every other member's app reads as fast as it can. Written: lines/s the sending app managed to write; delivered: lines/s all receivers read together while it wrote. The sending sidecar's RSS (VmRSS, every 50 ms) and its `podipc_memory_used_bytes` (every 100 ms) are its peaks during the run. Every line a receiver misses must be counted in `podipc_dropped_lines_total` on some sidecar (lost without a count = 0, else the run fails), every sequence still in order, and no sidecar may die.\n\n",
			cfg.memoryLimit, sizeName(cfg.queueBytes), cfg.overloadDuration, cfg.overloadFactor, sizeName(cfg.overloadSize))
		p("| N | offered, lines/s | written | delivered, all receivers | sending sidecar RSS idle → peak | memory used, peak / budget | missed by receivers | counted as dropped | lost without a count |\n")
		p("|---:|---:|---:|---:|---:|---:|---:|---|---:|\n")
		for _, pt := range points {
			o := pt.over
			p("| %d | %s | %s | %s | %s → %s | %s / %s | %d | %s | %.0f |\n", pt.n, si(o.res.offered), si(o.res.achieved), si(o.res.rate),
				mb(o.idle), mb(o.peak), mb(int64(o.usedPeak)), mb(int64(o.budget)), o.res.missing(), reasons(o.dropped), o.lost())
		}
		p("\n")
	}

	p("#### Idle RSS by number of peer links\n\nEach sidecar's VmRSS %s after all N were ready with all their peer links up, before any traffic: N−1 peer links each; and the sending sidecar's Go heap in use (`go_memstats_heap_inuse_bytes`), which also counts buffers allocated and not yet touched.\n\n", cfg.settle)
	p("| peer links | sending sidecar | median sidecar | highest sidecar | sending sidecar's heap in use |\n|---:|---:|---:|---:|---:|\n")
	for _, pt := range points {
		p("| %d | %s | %s | %s | %s |\n", pt.n-1, mb(pt.idle[0]), mb(int64(median(floats(pt.idle)))), mb(maxOf(pt.idle)), mb(int64(pt.idleHeap)))
	}
	if cfg.svgDir != "" {
		base := filepath.Base(cfg.svgDir)
		p("\n![Broadcast lines/s against N](%s/scale-lines.svg)\n\n![RSS against N](%s/scale-rss.svg)\n", base, base)
	}
}

// reasons formats drop counts by reason, largest first.
func reasons(m map[string]float64) string {
	if len(m) == 0 {
		return "0"
	}
	keys := slices.SortedFunc(maps.Keys(m), func(a, b string) int { return cmp.Compare(m[b], m[a]) })
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %.0f", k, m[k]))
	}
	return strings.Join(parts, ", ")
}

// times formats a/b, or a dash when b is 0.
func times(a, b float64) string {
	if b == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", a/b)
}

// cpuPerLine formats CPU seconds over lines, in ns a line.
func cpuPerLine(cpu float64, lines uint64) string {
	if lines == 0 {
		return "–"
	}
	return fmt.Sprintf("%.0f ns", cpu/float64(lines)*1e9)
}

// displayArgs shortens absolute paths in flag values to their last two elements
// (bin/podipc-sidecar), so that a report pasted into the docs names no machine's paths.
func displayArgs(args []string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		out[i] = a
		if k, v, ok := strings.Cut(a, "="); ok && filepath.IsAbs(v) {
			out[i] = k + "=" + filepath.Join(filepath.Base(filepath.Dir(v)), filepath.Base(v))
		}
	}
	return out
}

// nsPerLine formats CPU seconds over the lines delivered at rate during d, in ns a line.
func nsPerLine(cpu, rate float64, d time.Duration) string {
	if rate == 0 {
		return "–"
	}
	return fmt.Sprintf("%.0f ns", cpu/(rate*d.Seconds())*1e9)
}

func maxOf(xs []int64) int64 {
	var m int64
	for _, x := range xs {
		m = max(m, x)
	}
	return m
}

// writeScalePlots writes scale-lines.svg (aggregate and slowest-receiver lines/s against
// N) and scale-rss.svg (RSS against N) into dir.
func writeScalePlots(dir string, cfg scaleConfig, points []*scalePoint) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	var xs []string
	for _, pt := range points {
		xs = append(xs, fmt.Sprint(pt.n))
	}
	bcast := func(target string, size int, f func(*bcastFigures) float64) []float64 {
		ys := make([]float64, 0, len(points))
		for _, pt := range points {
			ys = append(ys, f(pt.bcast[target][size]))
		}
		return ys
	}
	var agg, slow, rss []series
	for i, size := range cfg.sizes {
		for _, target := range []string{"podipc", "nats"} {
			s := series{name: fmt.Sprintf("%s %s", display[target], sizeName(size)), color: seriesColor(target, i), dashed: target == "nats"}
			s.ys = bcast(target, size, func(f *bcastFigures) float64 { return f.res.rate })
			agg = append(agg, s)
			s.ys = bcast(target, size, func(f *bcastFigures) float64 { return f.res.slowest })
			slow = append(slow, s)
			s.name = fmt.Sprintf("%s peak, %s", map[string]string{"podipc": "sidecar", "nats": "nats-server"}[target], sizeName(size))
			s.ys = bcast(target, size, func(f *bcastFigures) float64 { return float64(f.peak) / 1e6 })
			rss = append(rss, s)
		}
	}
	var idle []float64
	for _, pt := range points {
		idle = append(idle, float64(pt.idle[0])/1e6)
	}
	rss = append(rss, series{name: "sidecar idle", color: "#555555", ys: idle})
	lines := stack(
		chart{title: "Broadcast to N−1 receivers: lines/s, all receivers together", xlabel: "members N", ylabel: "lines/s", xs: xs, series: agg}.svg(),
		chart{title: "Broadcast to N−1 receivers: lines/s to the slowest receiver", xlabel: "members N", ylabel: "lines/s", xs: xs, series: slow}.svg())
	if err := os.WriteFile(filepath.Join(dir, "scale-lines.svg"), []byte(lines), 0o644); err != nil {
		return err
	}
	r := stack(chart{title: "RSS of the sending sidecar and of nats-server, Broadcast", xlabel: "members N", ylabel: "MB", xs: xs, series: rss}.svg())
	return os.WriteFile(filepath.Join(dir, "scale-rss.svg"), []byte(r), 0o644)
}

// seriesColor gives each size its hue, podipc dark and NATS light.
func seriesColor(target string, i int) string {
	podipc := []string{"#1f4e99", "#b3401d", "#2a7a2a", "#6a2a8a"}
	nats := []string{"#6f9fe0", "#f0956f", "#7fcf7f", "#b98fd6"}
	if target == "nats" {
		return nats[i%len(nats)]
	}
	return podipc[i%len(podipc)]
}

// series is one line of a chart: a y value per x.
type series struct {
	name, color string
	dashed      bool
	ys          []float64
}

// chart is a line chart with categorical x values (evenly spaced: N doubles, so this is
// a log scale) and a linear y axis from 0.
type chart struct {
	title, xlabel, ylabel string
	xs                    []string
	series                []series
}

// Chart geometry, in SVG user units.
const (
	chartW, chartH             = 760, 360
	plotL, plotR, plotT, plotB = 80, 230, 40, 50
)

// svg renders the chart's elements in a chartW × chartH box, to be placed by stack.
func (c chart) svg() string {
	var b strings.Builder
	w, h := float64(chartW-plotL-plotR), float64(chartH-plotT-plotB)
	top := 0.0
	for _, s := range c.series {
		for _, y := range s.ys {
			top = max(top, y)
		}
	}
	step := niceStep(top / 5)
	top = math.Max(step, math.Ceil(top/step)*step)
	x := func(i int) float64 {
		if len(c.xs) == 1 {
			return plotL + w/2
		}
		return plotL + w*float64(i)/float64(len(c.xs)-1)
	}
	y := func(v float64) float64 { return plotT + h*(1-v/top) }
	fmt.Fprintf(&b, `<text x="%d" y="22" font-size="15" font-weight="bold">%s</text>`+"\n", plotL, esc(c.title))
	for v := 0.0; v <= top+step/2; v += step {
		fmt.Fprintf(&b, `<line x1="%d" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#dddddd"/>`+"\n", plotL, plotL+w, y(v), y(v))
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" font-size="11" text-anchor="end">%s</text>`+"\n", plotL-6, y(v)+4, si(v))
	}
	for i, label := range c.xs {
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" font-size="11" text-anchor="middle">%s</text>`+"\n", x(i), plotT+h+16, esc(label))
	}
	fmt.Fprintf(&b, `<line x1="%d" x2="%d" y1="%d" y2="%.1f" stroke="black"/>`+"\n", plotL, plotL, plotT, plotT+h)
	fmt.Fprintf(&b, `<line x1="%d" x2="%.1f" y1="%.1f" y2="%.1f" stroke="black"/>`+"\n", plotL, plotL+w, plotT+h, plotT+h)
	fmt.Fprintf(&b, `<text x="%.1f" y="%d" font-size="12" text-anchor="middle">%s</text>`+"\n", plotL+w/2, chartH-12, esc(c.xlabel))
	fmt.Fprintf(&b, `<text x="18" y="%.1f" font-size="12" text-anchor="middle" transform="rotate(-90 18 %.1f)">%s</text>`+"\n", plotT+h/2, plotT+h/2, esc(c.ylabel))
	for k, s := range c.series {
		dash := ""
		if s.dashed {
			dash = ` stroke-dasharray="6 4"`
		}
		pts := make([]string, 0, len(s.ys))
		for i, v := range s.ys {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", x(i), y(v)))
		}
		fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2"%s points="%s"/>`+"\n", s.color, dash, strings.Join(pts, " "))
		for i, v := range s.ys {
			fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="3" fill="%s"/>`+"\n", x(i), y(v), s.color)
		}
		ly := float64(plotT + 10 + 20*k)
		fmt.Fprintf(&b, `<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="%s" stroke-width="2"%s/>`+"\n", plotL+w+15, plotL+w+40, ly, ly, s.color, dash)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" font-size="11">%s</text>`+"\n", plotL+w+46, ly+4, esc(s.name))
	}
	return b.String()
}

// stack puts charts (from chart.svg) one above the other in one SVG document.
func stack(charts ...string) string {
	var b strings.Builder
	n := len(charts)
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif">`+"\n", chartW, chartH*n, chartW, chartH*n)
	b.WriteString(`<rect width="100%" height="100%" fill="white"/>` + "\n")
	for i, g := range charts {
		fmt.Fprintf(&b, `<g transform="translate(0 %d)">`+"\n%s</g>\n", chartH*i, g)
	}
	b.WriteString("</svg>\n")
	return b.String()
}

// niceStep rounds x up to 1, 2 or 5 times a power of ten.
func niceStep(x float64) float64 {
	if x <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(x)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= x {
			return m * p
		}
	}
	return 10 * p
}

func esc(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;").Replace(s)
}
