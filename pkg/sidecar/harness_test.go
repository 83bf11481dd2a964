package sidecar_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/podipc/podipc/internal/pki"
	"github.com/podipc/podipc/pkg/peertls"
)

// sidecarBin is the podipc-sidecar binary built once by TestMain.
var sidecarBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "podipc-sidecar-test")
	if err != nil {
		panic(err)
	}
	sidecarBin = filepath.Join(dir, "podipc-sidecar")
	args := append(append([]string{"build"}, raceFlags...), "-o", sidecarBin, "github.com/podipc/podipc/cmd/podipc-sidecar")
	build := exec.Command("go", args...)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building podipc-sidecar:", err)
		os.Exit(1)
	}
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

// subnet gives each test its own 127.<b>.<n>.0/24 (b from the process id), so the fixed
// ports (7000, 7701, 7702) of one test's sidecars never meet another's, even across
// concurrent runs of the package.
var subnet atomic.Int32

// chanCfg is one channel of a test cluster.
type chanCfg struct {
	name, delivery, policy, maxWait, maxBlock string
	queueBytes, maxMessageBytes               int
	// members names the pods of the channel (pod.name); nil: every pod.
	members []string
	// receiveOnly names the members (pod.name) that may only receive.
	receiveOnly []string
}

// pod is one sidecar process and its identity.
type pod struct {
	name, uid, ip string
	sockDir       string
	cmd           *exec.Cmd
	exited        chan struct{}
	exitErr       error
	log           *bytes.Buffer
	logMu         *sync.Mutex
	// files are the pod's certificate, key and bundle in a cluster with mutual TLS.
	files pki.Files
	// args are extra sidecar flags (later ones win over the harness's), env extra
	// environment variables.
	args, env []string
}

type cluster struct {
	t        *testing.T
	dir      string
	config   string
	channels []chanCfg
	pods     []*pod
	// args are extra flags of every sidecar.
	args []string
	// ca issued the pods' certificates; nil: plaintext peer links (--peer-tls=Disabled).
	ca *pki.CA
	// bin is the sidecar binary the pods run; empty: sidecarBin.
	bin string
}

// plainBin is a sidecar built without the race detector, for tests that measure how
// the sidecar holds a burst to its memory budget: under the detector the sixteen
// sidecars deliver so slowly that the burst never meets the budget within the test's
// waits. The test process itself still runs under the detector.
var plainBin = sync.OnceValues(func() (string, error) {
	if len(raceFlags) == 0 {
		return sidecarBin, nil
	}
	bin := sidecarBin + "-norace"
	out, err := exec.Command("go", "build", "-o", bin, "github.com/podipc/podipc/cmd/podipc-sidecar").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("building podipc-sidecar without -race: %w\n%s", err, out)
	}
	return bin, nil
})

// newMTLSCluster is newCluster with mutual TLS required on every peer link: each pod
// has a certificate from one root, in files its sidecar re-reads.
func newMTLSCluster(t *testing.T, n int, channels ...chanCfg) *cluster {
	t.Helper()
	c := prepareCluster(t, n, channels...)
	c.enableTLS()
	for _, p := range c.pods {
		c.start(p)
	}
	for _, p := range c.pods {
		c.waitReady(p)
		if !p.logged(`"msg":"Peer links use mutual TLS","mode":"Required"`) {
			t.Fatalf("%s did not log that its peer links use mutual TLS", p.name)
		}
	}
	c.waitLinks()
	return c
}

// enableTLS gives every pod a certificate from a new root (before they start).
func (c *cluster) enableTLS() {
	c.t.Helper()
	ca, err := pki.NewCA("podipc test root")
	if err != nil {
		c.t.Fatal(err)
	}
	c.ca = ca
	for _, p := range c.pods {
		dir := filepath.Join(c.dir, "tls-"+p.name)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			c.t.Fatal(err)
		}
		if p.files, err = ca.WriteFiles(dir, p.identity(), ca.PEM); err != nil {
			c.t.Fatal(err)
		}
	}
}

// identity is the pod as its certificate names it.
func (p *pod) identity() peertls.Pod {
	return peertls.Pod{TrustDomain: "cluster.local", Namespace: "demo", ServiceAccount: "default", Name: p.name, UID: p.uid}
}

// bothWays runs test over plaintext peer links and over mutual TLS.
func bothWays(t *testing.T, test func(t *testing.T, newCluster func(*testing.T, int, ...chanCfg) *cluster)) {
	t.Run("plaintext", func(t *testing.T) { test(t, newCluster) })
	t.Run("mtls", func(t *testing.T) { test(t, newMTLSCluster) })
}

// newCluster writes a static config for n pods sharing channels and starts them all.
func newCluster(t *testing.T, n int, channels ...chanCfg) *cluster {
	t.Helper()
	c := prepareCluster(t, n, channels...)
	c.startAll()
	c.waitLinks()
	return c
}

// prepareCluster writes a static config for n pods sharing channels, and starts none.
func prepareCluster(t *testing.T, n int, channels ...chanCfg) *cluster {
	t.Helper()
	net3 := 10 + subnet.Add(1)
	c := &cluster{t: t, dir: shortTempDir(t), channels: channels}
	c.config = filepath.Join(c.dir, "static.yaml")
	for i := range n {
		name := string(rune('a' + i))
		p := &pod{name: "pod-" + name, uid: "uid-" + name, ip: fmt.Sprintf("127.%d.%d.%d", 100+os.Getpid()%150, net3, i+1),
			sockDir: filepath.Join(c.dir, name)}
		if err := os.MkdirAll(p.sockDir, 0o755); err != nil {
			t.Fatal(err)
		}
		c.pods = append(c.pods, p)
	}
	c.writeConfig(c.pods)
	return c
}

// shortTempDir keeps node-ipc socket paths under the 108-byte limit.
func shortTempDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "pi")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

func (c *cluster) writeConfig(members []*pod) {
	var b strings.Builder
	b.WriteString("channels:\n")
	for i, ch := range c.channels {
		fmt.Fprintf(&b, "  %s:\n    localPort: %d\n    delivery: %s\n", ch.name, 7000+i, orDefault(ch.delivery, "Broadcast"))
		if ch.maxMessageBytes > 0 {
			fmt.Fprintf(&b, "    maxMessageBytes: %d\n", ch.maxMessageBytes)
		}
		fmt.Fprintf(&b, "    overflow: {policy: %s, maxWait: %s, maxBlock: %s, queueBytes: %d}\n", orDefault(ch.policy, "WaitThenDrop"),
			orDefault(ch.maxWait, "100ms"), orDefault(ch.maxBlock, "30s"), orDefaultInt(ch.queueBytes, 1<<20))
		b.WriteString("    members:\n")
		for _, p := range members {
			if ch.members != nil && !slices.Contains(ch.members, p.name) {
				continue
			}
			fmt.Fprintf(&b, "      - {namespace: demo, name: %s, uid: %s, ip: %s, peerPort: 7701, ready: true, serving: true, serviceAccount: %s, receiveOnly: %t}\n",
				p.name, p.uid, p.ip, p.identity().ServiceAccount, slices.Contains(ch.receiveOnly, p.name))
		}
	}
	tmp := c.config + ".tmp"
	if err := os.WriteFile(tmp, []byte(b.String()), 0o644); err != nil {
		c.t.Fatal(err)
	}
	if err := os.Rename(tmp, c.config); err != nil {
		c.t.Fatal(err)
	}
}

func orDefaultInt(v, d int) int {
	if v == 0 {
		return d
	}
	return v
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

// syncBuffer is a log sink safe for the process's writer and the test's reader.
type syncBuffer struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (s syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// startAll starts every pod's sidecar, then waits until each is ready.
func (c *cluster) startAll() {
	c.t.Helper()
	for _, p := range c.pods {
		c.start(p)
	}
	for _, p := range c.pods {
		c.waitReady(p)
	}
}

func (c *cluster) start(p *pod) {
	c.t.Helper()
	names := make([]string, 0, len(c.channels))
	for _, ch := range c.channels {
		names = append(names, ch.name)
	}
	bin := c.bin
	if bin == "" {
		bin = sidecarBin
	}
	cmd := exec.Command(bin, "--discovery=static", "--static-config="+c.config,
		"--app-address="+p.ip, "--peer-address="+p.ip, "--admin-address="+p.ip, "--socket-dir="+p.sockDir,
		"--debug-endpoints", "--drain-timeout=10s", "--log-level=debug")
	if c.ca != nil {
		cmd.Args = append(cmd.Args, p.files.Args()...)
	} else {
		cmd.Args = append(cmd.Args, "--peer-tls=Disabled")
	}
	cmd.Args = append(append(cmd.Args, c.args...), p.args...)
	cmd.Env = append(os.Environ(), "PODIPC_POD_NAME="+p.name, "PODIPC_POD_NAMESPACE=demo", "PODIPC_POD_UID="+p.uid,
		"PODIPC_POD_IP="+p.ip, "PODIPC_CHANNELS="+strings.Join(names, ","))
	cmd.Env = append(cmd.Env, p.env...)
	// The sidecars die with the test binary, even when it panics on a timeout.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p.log, p.logMu = &bytes.Buffer{}, &sync.Mutex{}
	cmd.Stderr = syncBuffer{mu: p.logMu, b: p.log}
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	p.cmd, p.exited = cmd, make(chan struct{})
	go func() {
		p.exitErr = cmd.Wait()
		close(p.exited)
	}()
	c.t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-p.exited
		p.logMu.Lock()
		if i := strings.Index(p.log.String(), "WARNING: DATA RACE"); i >= 0 {
			report := p.log.String()[i:]
			c.t.Errorf("the race detector reported a data race in %s:\n%s", p.name, report[:min(len(report), 8000)])
		}
		p.logMu.Unlock()
		if c.t.Failed() {
			p.logMu.Lock()
			c.t.Logf("log of %s:\n%s", p.name, lastLines(p.log.String(), 40))
			p.logMu.Unlock()
		}
	})
}

func lastLines(s string, n int) string {
	lines := strings.Split(s, "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// kill sends SIGKILL and waits for the process to end.
func (c *cluster) kill(p *pod) {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.exited
}

// terminate sends SIGTERM and returns the exit status.
func (c *cluster) terminate(p *pod) error {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return p.exitErr
	case <-time.After(30 * time.Second):
		c.t.Fatalf("%s did not exit within 30s of SIGTERM", p.name)
		return nil
	}
}

func (c *cluster) url(p *pod, path string) string {
	return "http://" + net.JoinHostPort(p.ip, "7702") + path
}

func (c *cluster) waitReady(p *pod) {
	c.t.Helper()
	eventually(c.t, "sidecar "+p.name+" ready", func() bool { return c.readyz(p) == http.StatusOK })
}

// readyz returns the status code of p's /readyz, or 0 if it does not answer.
func (c *cluster) readyz(p *pod) int {
	resp, err := http.Get(c.url(p, "/readyz"))
	if err != nil {
		return 0
	}
	_ = resp.Body.Close()
	return resp.StatusCode
}

// logged says whether p's log contains s.
func (p *pod) logged(s string) bool {
	p.logMu.Lock()
	defer p.logMu.Unlock()
	return strings.Contains(p.log.String(), s)
}

// waitLinks waits until every pod has an established link to every other pod.
func (c *cluster) waitLinks() {
	c.t.Helper()
	for _, p := range c.pods {
		eventually(c.t, "peer links of "+p.name, func() bool {
			return c.metric(p, `podipc_peer_links{direction="out",state="up"}`) == float64(len(c.pods)-1)
		})
	}
}

// metric returns the value of one series (name with labels exactly as exposed), or 0.
func (c *cluster) metric(p *pod, series string) float64 {
	resp, err := http.Get(c.url(p, "/metrics"))
	if err != nil {
		return -1
	}
	defer func() { _ = resp.Body.Close() }()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), series+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return 0
}

func (c *cluster) post(p *pod, path string) {
	c.t.Helper()
	resp, err := http.Post(c.url(p, path), "text/plain", nil)
	if err != nil {
		c.t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		c.t.Fatalf("POST %s: %s", path, resp.Status)
	}
}

// fds counts the open file descriptors of a sidecar.
func fds(t *testing.T, p *pod) int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// app is a line client of a channel that records everything it reads.
type app struct {
	conn    net.Conn
	mu      sync.Mutex
	got     []string
	done    chan struct{}
	started atomic.Bool
	err     error
}

// dialApp connects to the line port of the i-th channel on p, and starts reading
// unless paused (then call read later).
func (c *cluster) dialApp(p *pod, ch int, paused bool) *app {
	c.t.Helper()
	var conn net.Conn
	eventually(c.t, "dial app port", func() bool {
		var err error
		conn, err = net.Dial("tcp", net.JoinHostPort(p.ip, strconv.Itoa(7000+ch)))
		return err == nil
	})
	a := &app{conn: conn, done: make(chan struct{})}
	c.t.Cleanup(func() {
		_ = conn.Close()
		if a.started.Load() {
			<-a.done
		}
	})
	if !paused {
		a.read()
	}
	return a
}

func (a *app) read() {
	a.started.Store(true)
	go func() {
		defer close(a.done)
		sc := bufio.NewScanner(a.conn)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			a.mu.Lock()
			a.got = append(a.got, sc.Text())
			a.mu.Unlock()
		}
		a.err = sc.Err()
	}()
}

func (a *app) lines() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.got...)
}

func (a *app) count() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.got)
}

// send writes lines "<prefix><i>" for i in [from, to) in large writes.
func (a *app) send(t *testing.T, prefix string, from, to int) {
	t.Helper()
	if err := a.write(prefix, from, to); err != nil {
		t.Fatal(err)
	}
}

// write is send for other goroutines.
func (a *app) write(prefix string, from, to int) error {
	w := bufio.NewWriterSize(a.conn, 64<<10)
	for i := from; i < to; i++ {
		_, _ = fmt.Fprintf(w, "%s%08d\n", prefix, i)
	}
	return w.Flush()
}

// waitPresence waits until p sees n connections on channel ch at every other pod.
func (c *cluster) waitConns(p *pod, channel string, n int) {
	c.t.Helper()
	eventually(c.t, fmt.Sprintf("%d connections on %s", n, p.name), func() bool {
		return c.metric(p, fmt.Sprintf(`podipc_local_connections{channel=%q}`, channel)) == float64(n)
	})
}

// eventually polls cond for up to a generous bound; never a timing assertion.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// checkSeq asserts got is exactly prefix+from … prefix+(to-1), in order.
func checkSeq(t *testing.T, who string, got []string, prefix string, from, to int) {
	t.Helper()
	if len(got) != to-from {
		t.Fatalf("%s received %d lines, want %d", who, len(got), to-from)
	}
	for i, l := range got {
		if want := fmt.Sprintf("%s%08d", prefix, from+i); l != want {
			t.Fatalf("%s line %d = %q, want %q", who, i, l, want)
		}
	}
}

// seqOf parses the number of a line made by send.
func seqOf(t *testing.T, line, prefix string) int {
	n, err := strconv.Atoi(strings.TrimPrefix(line, prefix))
	if err != nil {
		t.Fatalf("unexpected line %q", line)
	}
	return n
}

var _ = io.EOF
var _ = context.Background

// dialNodeIPC connects to p's node-ipc socket of channel, waiting for the sidecar to bind
// it; the connection is closed when the test ends.
func dialNodeIPC(t *testing.T, p *pod, channel string) net.Conn {
	t.Helper()
	var nc net.Conn
	eventually(t, "dial node-ipc socket", func() bool {
		var err error
		nc, err = net.Dial("unix", filepath.Join(p.sockDir, "app."+channel))
		return err == nil
	})
	t.Cleanup(func() { _ = nc.Close() })
	return nc
}
