package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// The overload phase of `loadtest scale`: the N member sidecars run again, now with the
// chart's default container memory limit (-memory-limit, passed as --memory-limit as the
// webhook's downward API would: the Go runtime's soft limit at 90 % of it, the memory
// budget at half), and the sending app floods channel `flood` (WaitThenDrop) open loop at
// -overload-factor times the closed-loop rate just measured, while every receiver reads as
// fast as it can. The sending sidecar then holds lines for N−1 links whose peers cannot
// keep up: what its memory budget is for. Lines may be dropped, but every line a receiver
// misses must be counted, and the sending sidecar must stay alive under its limit.

// scaleOverload is the overload run at one N.
type scaleOverload struct {
	res        overloadResult
	idle, peak int64   // the sending sidecar's RSS
	budget     float64 // its podipc_memory_budget_bytes
	usedPeak   float64 // the highest podipc_memory_used_bytes it reported
	dropped    map[string]float64
	counted    float64 // drops on channel flood, all sidecars
}

// lost is the lines some receiver missed that no sidecar counted.
func (o *scaleOverload) lost() float64 { return float64(o.res.missing()) - o.counted }

// appDialer connects the sending app to tx and a receiving app to each of rx.
type appDialer func(ctx context.Context, tx string, rx ...string) (path, error)

// dialApps is the appDialer of the runs: every app dials at once, receivers first.
func dialApps(ctx context.Context, tx string, rx ...string) (path, error) {
	return dialBoth(ctx, tx, rx...)
}

// measureScaleOverload starts ms's sidecars with the memory limit and floods them at
// rate lines/s of size bytes; readRate, if not 0, makes every receiver read at most that
// many lines a second (the scale run's receivers read as fast as they can). dial connects
// the apps (dialApps; a test connects a receiver late).
func measureScaleOverload(ctx context.Context, cfg scaleConfig, dir string, ms []member, size int, rate, readRate float64, dial appDialer) (*scaleOverload, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	args := append(append([]string(nil), cfg.sidecarArgs...), "--memory-limit="+cfg.memoryLimit)
	t, err := startSidecars(ctx, dir, "podipc-limited", cfg.sidecar, ms, cfg.queueBytes, plainArgs, args)
	if err != nil {
		return nil, err
	}
	defer t.stop()
	time.Sleep(cfg.settle)
	o := &scaleOverload{dropped: map[string]float64{}}
	pid := t.procs[0].pid()
	o.idle, _ = rssBytes(pid)
	gauges, err := scrapeMemory(ctx, t.metrics[0])
	if err != nil {
		return nil, err
	}
	o.budget = gauges["podipc_memory_budget_bytes"]
	// The drops are counted from when every receiver has seen a sync line: a sync line
	// that reaches a member before its receiver connected is counted no_connection, and
	// is not a line the receivers miss.
	var before dropCounts
	synced := func() (err error) {
		before, err = readDrops(ctx, t.metrics)
		return err
	}

	var rx []string
	for _, m := range ms[1:] {
		rx = append(rx, hostPort(m.ip, floodPort))
	}
	open := func(ctx context.Context) (path, error) { return dial(ctx, hostPort(ms[0].ip, floodPort), rx...) }
	rss := sampleRSS([]int{pid}, 50*time.Millisecond)
	used := sampleUsed(t.metrics[0], 100*time.Millisecond)
	o.res, err = measureOverload(ctx, open, synced, size, rate, readRate, cfg.overloadDuration)
	o.peak, o.usedPeak = rss.stop()[pid], used.stop()
	if err == nil {
		err = t.alive() // a sidecar killed at its limit (or crashed) fails the run
	}
	if err != nil {
		return nil, err
	}
	after, err := readDrops(ctx, t.metrics)
	if err != nil {
		return nil, err
	}
	for k, v := range after {
		if dv := v - before[k]; dv != 0 && strings.Contains(k, `channel="flood"`) {
			o.counted += dv
			o.dropped[reasonOf(k)] += dv
		}
	}
	if lost := o.lost(); lost != 0 {
		return o, fmt.Errorf("overload at %d members: receivers missed %d lines, the sidecars counted %.0f (%v): %.0f lost without a count",
			len(ms), o.res.missing(), o.counted, o.dropped, lost)
	}
	return o, nil
}

// reasonOf returns the reason label of a drop series.
func reasonOf(series string) string {
	_, r, ok := strings.Cut(series, `reason="`)
	if !ok {
		return "?"
	}
	r, _, _ = strings.Cut(r, `"`)
	return r
}

// scrapeMemory reads the sidecar's podipc_memory_* gauges.
func scrapeMemory(ctx context.Context, url string) (map[string]float64, error) {
	return scrapeMetrics(ctx, url, func(name string) bool { return strings.HasPrefix(name, "podipc_memory_") })
}

// usedSampler keeps the highest podipc_memory_used_bytes a sidecar reports.
type usedSampler struct {
	cancel context.CancelFunc
	done   chan struct{}
	mu     sync.Mutex
	peak   float64
}

func sampleUsed(url string, every time.Duration) *usedSampler {
	ctx, cancel := context.WithCancel(context.Background())
	s := &usedSampler{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			if g, err := scrapeMemory(ctx, url); err == nil {
				s.mu.Lock()
				s.peak = max(s.peak, g["podipc_memory_used_bytes"])
				s.mu.Unlock()
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return s
}

func (s *usedSampler) stop() float64 {
	s.cancel()
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peak
}

// overloadDir is where the overload run of N members keeps its configs and logs.
func overloadDir(dir string) string { return filepath.Join(dir, "overload") }
