package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// target is one system under test: how to open a path through it, and the processes
// that forward its lines (whose CPU and RSS are reported).
type target struct {
	name  string
	open  opener
	procs []*proc
	// openFlood opens a path on the lossy channel used by the overload run (podipc only).
	openFlood opener
	// metrics are the sidecars' /metrics addresses (podipc only).
	metrics []string
	// url is the server's client URL (NATS only).
	url string
	// cleanup releases what setup acquired besides procs.
	cleanup func()
}

// usage is the CPU seconds and read/write system calls of the forwarding processes so far;
// the first process is the one the sending app talks to.
func (t *target) usage() usage {
	var u usage
	for i, p := range t.procs {
		cpu := cpuSeconds(p.pid())
		u.cpu += cpu
		u.syscalls += ioSyscalls(p.pid())
		if i == 0 {
			u.sender = cpu
		}
	}
	return u
}

func (t *target) alive() error {
	for _, p := range t.procs {
		if err := p.exited(); err != nil {
			return err
		}
	}
	return nil
}

// stop ends the processes all at once (64 sidecars one by one would take seconds).
func (t *target) stop() {
	var wg sync.WaitGroup
	for _, p := range t.procs {
		wg.Go(p.stop)
	}
	wg.Wait()
	if t.cleanup != nil {
		t.cleanup()
	}
}

// The sidecar's peer and admin ports (README) and the ports of the measured channels.
const (
	peerPort  = 7701
	adminPort = 7702
	benchPort = 7000 // channel "bench": Block, lossless; the throughput and RTT runs
	floodPort = 7001 // channel "flood": WaitThenDrop; the overload run
)

// member is one pod of the static channels: one sidecar.
type member struct{ pod, uid, ip string }

// staticConfig is the static discovery file shared by all sidecars: the members and two
// channels. Message bounds are the Channel defaults; so are queue bounds
// unless -queue-bytes says otherwise.
func staticConfig(ms []member, queueBytes int) string {
	var members strings.Builder
	members.WriteString("    members:\n")
	for _, m := range ms {
		fmt.Fprintf(&members, "      - {namespace: bench, name: %s, uid: %s, ip: %s, peerPort: %d, ready: true, serving: true}\n", m.pod, m.uid, m.ip, peerPort)
	}
	return "channels:\n" +
		fmt.Sprintf("  bench:\n    localPort: %d\n    delivery: Broadcast\n    maxMessageBytes: 65536\n", benchPort) +
		fmt.Sprintf("    overflow: {policy: Block, maxWait: 100ms, queueBytes: %d}\n", queueBytes) + members.String() +
		fmt.Sprintf("  flood:\n    localPort: %d\n    delivery: Broadcast\n    maxMessageBytes: 65536\n", floodPort) +
		fmt.Sprintf("    overflow: {policy: WaitThenDrop, maxWait: 100ms, queueBytes: %d}\n", queueBytes) + members.String()
}

// setupPodipc starts sidecar A on ipA and sidecar B on ipB in static mode, as target
// name, each with the flags podArgs returns for it (peer TLS) and extraArgs: the sending
// app talks to A, the receiving app to B.
func setupPodipc(ctx context.Context, dir, name, bin, ipA, ipB string, queueBytes int,
	podArgs func(dir, pod, uid string) ([]string, error), extraArgs []string) (*target, error) {
	ms := []member{{"pod-a", "uid-a", ipA}, {"pod-b", "uid-b", ipB}}
	t, err := startSidecars(ctx, dir, name, bin, ms, queueBytes, podArgs, extraArgs)
	if err != nil {
		return nil, err
	}
	t.open = func(ctx context.Context) (path, error) {
		return dialBoth(ctx, hostPort(ipA, benchPort), hostPort(ipB, benchPort))
	}
	t.openFlood = func(ctx context.Context) (path, error) {
		return dialBoth(ctx, hostPort(ipA, floodPort), hostPort(ipB, floodPort))
	}
	return t, nil
}

// startSidecars starts one sidecar per member in static mode as target name, every one a
// member of both channels, each with the flags podArgs returns for it and extraArgs, and
// waits until all are ready. The target's processes are in members' order.
func startSidecars(ctx context.Context, dir, name, bin string, ms []member, queueBytes int,
	podArgs func(dir, pod, uid string) ([]string, error), extraArgs []string) (*target, error) {
	cfg := filepath.Join(dir, name+"-static.yaml")
	if err := os.WriteFile(cfg, []byte(staticConfig(ms, queueBytes)), 0o644); err != nil {
		return nil, err
	}
	t := &target{name: name}
	for _, m := range ms {
		if err := portsFree(ctx, m.ip, benchPort, floodPort, peerPort, adminPort); err != nil {
			t.stop()
			return nil, err
		}
		sock := filepath.Join(dir, name+"-"+m.pod+"-sockets")
		if err := os.MkdirAll(sock, 0o755); err != nil {
			t.stop()
			return nil, err
		}
		env := []string{
			"PODIPC_POD_NAME=" + m.pod, "PODIPC_POD_NAMESPACE=bench", "PODIPC_POD_UID=" + m.uid,
			"PODIPC_POD_IP=" + m.ip, "PODIPC_CHANNELS=bench,flood",
		}
		tlsArgs, err := podArgs(dir, m.pod, m.uid)
		if err != nil {
			t.stop()
			return nil, err
		}
		args := append(append([]string{
			"--discovery=static", "--static-config=" + cfg,
			"--app-address=" + m.ip, "--peer-address=" + m.ip, "--admin-address=" + m.ip,
			"--socket-dir=" + sock,
		}, tlsArgs...), extraArgs...)
		p, err := startProc(ctx, dir, name+"-sidecar-"+m.pod, env, bin, args...)
		if err != nil {
			t.stop()
			return nil, err
		}
		t.procs = append(t.procs, p)
		t.metrics = append(t.metrics, fmt.Sprintf("http://%s/metrics", hostPort(m.ip, adminPort)))
	}
	for i, p := range t.procs {
		if err := p.waitHTTP(ctx, fmt.Sprintf("http://%s/readyz", hostPort(ms[i].ip, adminPort)), 30*time.Second); err != nil {
			t.stop()
			return nil, err
		}
	}
	return t, nil
}

// setupRelay starts relay processes 1 and 2 and the receiving app's listener:
// sender → ip1 → ip2 → ipRecv.
func setupRelay(ctx context.Context, dir, self, ip1, ip2, ipRecv string, port int) (*target, error) {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", hostPort(ipRecv, port))
	if err != nil {
		return nil, fmt.Errorf("receiving app listener: %w", err)
	}
	t := &target{name: "relay", cleanup: func() { _ = ln.Close() }}
	hops := []struct{ name, listen, to string }{
		{"relay-2", hostPort(ip2, port), hostPort(ipRecv, port)},
		{"relay-1", hostPort(ip1, port), hostPort(ip2, port)},
	}
	for _, h := range hops {
		p, err := startProc(ctx, dir, h.name, nil, self, "relay", "-listen", h.listen, "-to", h.to)
		if err != nil {
			t.stop()
			return nil, err
		}
		t.procs = append(t.procs, p)
		if err := p.waitLog("ready", 10*time.Second); err != nil {
			t.stop()
			return nil, err
		}
	}
	tl := ln.(*net.TCPListener)
	t.open = func(ctx context.Context) (path, error) { return dialAccept(ctx, hostPort(ip1, port), tl) }
	return t, nil
}

// setupNATS starts nats-server on ip at a free port.
func setupNATS(ctx context.Context, dir, bin, ip string) (*target, error) {
	port, err := freePort(ctx, ip)
	if err != nil {
		return nil, err
	}
	p, err := startProc(ctx, dir, "nats-server", nil, bin, "-a", ip, "-p", strconv.Itoa(port))
	if err != nil {
		return nil, err
	}
	t := &target{name: "NATS", procs: []*proc{p}}
	if err := p.waitLog("Server is ready", 10*time.Second); err != nil {
		t.stop()
		return nil, err
	}
	t.url = "nats://" + hostPort(ip, port)
	t.open = func(context.Context) (path, error) { return openNATS(t.url, 1) }
	return t, nil
}

func hostPort(ip string, port int) string { return net.JoinHostPort(ip, strconv.Itoa(port)) }

// portsFree fails early, with a clear message, if another process (another engineer's
// sidecar, say) already holds one of the ports a sidecar needs.
func portsFree(ctx context.Context, ip string, ports ...int) error {
	var busy []string
	for _, port := range ports {
		var lc net.ListenConfig
		ln, err := lc.Listen(ctx, "tcp", hostPort(ip, port))
		if err != nil {
			busy = append(busy, strconv.Itoa(port))
			continue
		}
		_ = ln.Close()
	}
	if len(busy) > 0 {
		return fmt.Errorf("%s: ports %s are in use; pick other addresses with -addr-a/-addr-b", ip, strings.Join(busy, ","))
	}
	return nil
}

func freePort(ctx context.Context, ip string) (int, error) {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", hostPort(ip, 0))
	if err != nil {
		return 0, err
	}
	defer func() { _ = ln.Close() }()
	return ln.Addr().(*net.TCPAddr).Port, nil
}
