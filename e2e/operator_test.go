//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestOperatorView runs the operator's commands from the host, as a user with the e2e
// kubeconfig runs them from a laptop: podipc tail and send through a port-forward into a
// member pod, podipc status through the pod proxy. It installs the chart and a 3-replica
// talk Deployment on the Broadcast channel chat, then checks that tail receives the
// members' lines, that a line sent from outside reaches every member, that deleting the
// pod tail is attached to makes it reattach to another and say so, and that status
// reports every member connected with no drops, then names the member whose network
// interface the test takes down.
func TestOperatorView(t *testing.T) {
	kube := newCRClient(t)
	j := &journey{kube: kube, ns: newNamespace(t, nil)}
	t.Cleanup(func() {
		_, _ = helm(context.Background(), "uninstall", release, "-n", releaseNS, "--wait", "--timeout", "3m")
	})
	j.helmInstall(t)
	j.channels(t)
	j.broadcast(t) // the talk Deployment, its replicas hearing each other
	cli := buildCLI(t)
	kubeconfig := os.Getenv("PODIPC_E2E_KUBECONFIG")

	// tail from outside: the members' hellos arrive.
	tail := startCLI(t, cli, "tail", "chat", "-n", j.ns, "--kubeconfig", kubeconfig)
	attached := tail.waitErr(t, regexp.MustCompile(`attached to pod `+j.ns+`/(\S+)`))[1]
	heard := func(from time.Time) map[string]bool {
		got := map[string]bool{}
		for _, l := range tail.linesSince(from) {
			if f := strings.Fields(l); len(f) == 4 && f[0] == "hello" {
				got[f[1]] = true
			}
		}
		return got
	}
	start := time.Now()
	waitUntil(t, "tail from outside never heard two members' hellos", func() (bool, string) {
		return len(heard(start)) >= 2, fmt.Sprintf("heard %v; stderr %s", heard(start), tail.stderr())
	})

	// send from outside: every member's app logs the line.
	out, err := exec.CommandContext(t.Context(), cli, "send", "chat", "-n", j.ns, "--kubeconfig", kubeconfig, "from the operator").CombinedOutput()
	if err != nil {
		t.Fatalf("podipc send: %v\n%s", err, out)
	}
	for _, pod := range j.talkPods {
		j.waitLogContains(t, pod, "recv from the operator")
	}
	waitUntil(t, "tail never printed the line sent from outside", func() (bool, string) {
		return strings.Contains(tail.stdout(), "from the operator\n"), tail.stdout()
	})

	// status: every member connected, no drops.
	status := func() string {
		out, err := exec.CommandContext(t.Context(), cli, "status", "chat", "-n", j.ns, "--kubeconfig", kubeconfig, "--interval", "2s").CombinedOutput()
		if err != nil {
			t.Fatalf("podipc status: %v\n%s", err, out)
		}
		return string(out)
	}
	want := "all 3 members connected to each other, no drops in 2s"
	var last string
	waitUntil(t, "podipc status never reported every member connected", func() (bool, string) {
		last = status()
		return strings.Contains(last, want), last
	})
	t.Logf("podipc status chat:\n%s", last)

	// Delete the pod tail is attached to: tail attaches to another member and says so.
	if err := clientset.CoreV1().Pods(j.ns).Delete(t.Context(), attached, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	re := tail.waitErr(t, regexp.MustCompile(`reattached to pod `+j.ns+`/(\S+) \(was pod `+j.ns+`/`+regexp.QuoteMeta(attached)+`\)`))
	if re[1] == attached {
		t.Fatalf("tail reattached to the deleted pod %s", attached)
	}
	start = time.Now()
	waitUntil(t, "tail heard nothing after reattaching", func() (bool, string) {
		return len(heard(start)) >= 1, tail.stderr()
	})
	t.Logf("tail's standard error:\n%s", tail.stderr())
	j.waitReplicas(t, 3)
	j.talkPods = j.survivors(t)
	waitUntil(t, "podipc status never reported the new member connected", func() (bool, string) {
		last = status()
		return strings.Contains(last, want), last
	})

	// Take one member's interface down: status names it as the one others cannot reach.
	victim := j.talkPods[0]
	p, err := clientset.CoreV1().Pods(j.ns).Get(t.Context(), victim, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	veth := hostVeth(t, p.Status.PodIP)
	ip(t, "link", "set", veth, "down")
	t.Cleanup(func() { ip(t, "link", "set", veth, "up") })
	waitUntil(t, "podipc status never named the unreachable member", func() (bool, string) {
		last = status()
		for _, other := range j.talkPods[1:] {
			if !strings.Contains(last, other+" cannot reach "+victim+": link down") {
				return false, last
			}
		}
		return !strings.Contains(last, "all 3 members connected"), last
	})
	t.Logf("podipc status chat with %s's interface down:\n%s", victim, last)
	ip(t, "link", "set", veth, "up")
	waitUntil(t, "podipc status never reported the member back", func() (bool, string) {
		last = status()
		return strings.Contains(last, "all 3 members connected to each other"), last
	})
}

// buildCLI builds cmd/podipc for the host.
func buildCLI(t *testing.T) string {
	t.Helper()
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "podipc")
	cmd := exec.CommandContext(t.Context(), "go", "build", "-o", bin, "./cmd/podipc")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building podipc: %v\n%s", err, out)
	}
	return bin
}

// cliProcess is a long-running podipc command whose output the test reads as it comes.
type cliProcess struct {
	mu       sync.Mutex
	out, err strings.Builder
	lines    []timedLine
}

type timedLine struct {
	at   time.Time
	text string
}

func startCLI(t *testing.T, bin string, args ...string) *cliProcess {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &cliProcess{}
	cmd.Stderr = writerFunc(func(b []byte) {
		p.mu.Lock()
		defer p.mu.Unlock()
		p.err.Write(b)
	})
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			p.mu.Lock()
			p.out.WriteString(sc.Text() + "\n")
			p.lines = append(p.lines, timedLine{time.Now(), sc.Text()})
			p.mu.Unlock()
		}
		_, _ = io.Copy(io.Discard, stdout)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		_ = cmd.Wait()
	})
	return p
}

func (p *cliProcess) stdout() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

func (p *cliProcess) stderr() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err.String()
}

func (p *cliProcess) linesSince(from time.Time) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for _, l := range p.lines {
		if !l.at.Before(from) {
			out = append(out, l.text)
		}
	}
	return out
}

// waitErr waits for re on standard error and returns its submatches.
func (p *cliProcess) waitErr(t *testing.T, re *regexp.Regexp) []string {
	t.Helper()
	var m []string
	waitUntil(t, "podipc never said "+re.String(), func() (bool, string) {
		m = re.FindStringSubmatch(p.stderr())
		return m != nil, p.stderr()
	})
	return m
}

type writerFunc func([]byte)

func (f writerFunc) Write(b []byte) (int, error) { f(b); return len(b), nil }

func waitUntil(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	eventually(t, what, func(context.Context) (bool, string, error) {
		ok, state := cond()
		return ok, state, nil
	})
}

// hostVeth returns the host side of the veth of the pod with IP podIP: the CNI bridge
// plugin created it, in one of the cni-* network namespaces of the node.
func hostVeth(t *testing.T, podIP string) string {
	t.Helper()
	netns, err := filepath.Glob("/run/netns/cni-*")
	if err != nil {
		t.Fatal(err)
	}
	for _, path := range netns {
		ns := filepath.Base(path)
		addrs, err := exec.CommandContext(t.Context(), "ip", "-n", ns, "-o", "-4", "addr", "show", "dev", "eth0").Output()
		if err != nil || !strings.Contains(string(addrs), " "+podIP+"/") {
			continue
		}
		// "3: eth0@if12: ..." names the host side's interface index.
		link, err := exec.CommandContext(t.Context(), "ip", "-n", ns, "-o", "link", "show", "dev", "eth0").Output()
		if err != nil {
			t.Fatal(err)
		}
		m := regexp.MustCompile(`eth0@if(\d+):`).FindSubmatch(link)
		if m == nil {
			t.Fatalf("no peer index in %q", link)
		}
		all, err := exec.CommandContext(t.Context(), "ip", "-o", "link", "show").Output()
		if err != nil {
			t.Fatal(err)
		}
		if host := regexp.MustCompile(`(?m)^` + string(m[1]) + `: ([^:@]+)[@:]`).FindSubmatch(all); host != nil {
			return string(host[1])
		}
		t.Fatalf("no host interface with index %s", m[1])
	}
	t.Fatalf("no network namespace holds pod IP %s", podIP)
	return ""
}

func ip(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Errorf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}
