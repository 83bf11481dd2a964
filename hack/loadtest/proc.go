package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// proc is a child process the tool started: a sidecar, a relay or nats-server.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string // file holding its stdout and stderr
	done chan struct{}
	err  error // why it exited; valid once done is closed
}

// startProc starts a child that dies with the tool (Pdeathsig), logging to dir/name.log.
func startProc(ctx context.Context, dir, name string, env []string, bin string, args ...string) (*proc, error) {
	logPath := filepath.Join(dir, name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		_ = f.Close()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// exited returns an error if the process has ended.
func (p *proc) exited() error {
	select {
	case <-p.done:
		if p.err == nil {
			return fmt.Errorf("%s exited with status 0\n%s", p.name, p.tail())
		}
		return fmt.Errorf("%s exited: %w\n%s", p.name, p.err, p.tail())
	default:
		return nil
	}
}

// stop asks the process to end with SIGTERM and kills it after a bound.
func (p *proc) stop() {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// tail returns the last lines of the process's log, for error messages.
func (p *proc) tail() string {
	b, _ := os.ReadFile(p.log)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-15):], "\n")
}

// waitLog waits up to limit for a line containing s in the process's log.
func (p *proc) waitLog(s string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		if err := p.exited(); err != nil {
			return err
		}
		if b, _ := os.ReadFile(p.log); bytes.Contains(b, []byte(s)) {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("%s: no %q in its log within %s\n%s", p.name, s, limit, p.tail())
}

// waitHTTP waits up to limit for url to answer 200.
func (p *proc) waitHTTP(ctx context.Context, url string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	c := http.Client{Timeout: time.Second}
	for time.Now().Before(deadline) {
		if err := p.exited(); err != nil {
			return err
		}
		if resp, err := get(ctx, &c, url); err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s: %s not 200 within %s\n%s", p.name, url, limit, p.tail())
}

// rssBytes reads VmRSS from /proc/<pid>/status.
func rssBytes(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer func() { _ = f.Close() }()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, errors.New("no VmRSS")
}

// clockTick is USER_HZ, the unit of /proc/<pid>/stat times on Linux.
const clockTick = 100

// cpuSeconds reads user+system CPU time from /proc/<pid>/stat.
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name, which is in parentheses and may hold spaces.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / clockTick
}

// ioSyscalls reads the read and write system calls made so far (syscr + syscw) from
// /proc/<pid>/io: with the CPU time, it shows how well a forwarder batches.
func ioSyscalls(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
	if err != nil {
		return 0
	}
	var n float64
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ": ")
		if ok && (k == "syscr" || k == "syscw") {
			x, _ := strconv.ParseFloat(v, 64)
			n += x
		}
	}
	return n
}

// rssSampler records the peak RSS of some processes until stopped: overall, and after
// a split time (so that growth late in a run shows).
type rssSampler struct {
	peak, late map[int]int64
	split      time.Time
	cancel     context.CancelFunc
	done       chan struct{}
}

func sampleRSS(pids []int, every time.Duration) *rssSampler {
	return sampleRSSSplit(pids, every, time.Time{})
}

func sampleRSSSplit(pids []int, every time.Duration, split time.Time) *rssSampler {
	ctx, cancel := context.WithCancel(context.Background())
	s := &rssSampler{peak: map[int]int64{}, late: map[int]int64{}, split: split, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			late := !s.split.IsZero() && time.Now().After(s.split)
			for _, pid := range pids {
				r, err := rssBytes(pid)
				if err != nil {
					continue
				}
				s.peak[pid] = max(s.peak[pid], r)
				if late {
					s.late[pid] = max(s.late[pid], r)
				}
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

// stop ends sampling and returns the peak RSS per pid.
func (s *rssSampler) stop() map[int]int64 {
	s.cancel()
	<-s.done
	return s.peak
}

// scrapeDrops reads every podipc_*drop* counter on a /metrics page, by series.
func scrapeDrops(ctx context.Context, url string) (map[string]float64, error) {
	return scrapeMetrics(ctx, url, func(name string) bool { return strings.Contains(name, "drop") })
}

// scrapeMetrics reads the podipc_* series of a /metrics page whose metric name keep
// accepts, by series.
func scrapeMetrics(ctx context.Context, url string, keep func(name string) bool) (map[string]float64, error) {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := get(ctx, &c, url)
	if err != nil {
		return nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: %s", url, resp.Status)
	}
	out := map[string]float64{}
	s := bufio.NewScanner(io.LimitReader(resp.Body, 8<<20))
	for s.Scan() {
		line := s.Text()
		if strings.HasPrefix(line, "#") || (!strings.HasPrefix(line, "podipc_") && !strings.HasPrefix(line, "go_")) {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		series := line[:i]
		name, _, _ := strings.Cut(series, "{")
		if !keep(name) {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		out[series] = v
	}
	return out, s.Err()
}

func get(ctx context.Context, c *http.Client, url string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	return c.Do(req)
}
