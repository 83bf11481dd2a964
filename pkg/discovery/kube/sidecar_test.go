package kube_test

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/rand"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/controller-runtime/pkg/client"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/internal/testenv"
)

// talkPort is the test Channel's localPort.
const talkPort = 7400

// TestSidecarsInKubernetesMode runs real podipc-sidecar processes with
// --discovery=kubernetes against the test API server, each as its pod's service account
// with only the access the controller grants, on the pod IPs the controller publishes
// (testenv.PodCIDR, local inside the test's network namespace). Apps on the pods' line
// ports exchange lines through them while members join and leave, the API server
// restarts, and the Channel's delivery is edited.
func TestSidecarsInKubernetesMode(t *testing.T) {
	noLeaks(t)
	bin := buildSidecar(t)
	ns := "t-" + rand.String(8)
	if err := env.Client.Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
		t.Fatal(err)
	}
	ch := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "talk"},
		Spec: podipcv1alpha1.ChannelSpec{LocalPort: talkPort, Delivery: podipcv1alpha1.DeliveryBroadcast}}
	if err := env.Client.Create(t.Context(), ch); err != nil {
		t.Fatal(err)
	}
	kubeconfig := writeKubeconfig(t, "system:serviceaccount:"+ns+":default")
	run := func(name, ip string) (*sidecarProc, *app) {
		p := addPod(t, sidecarPod(ns, name, "talk", ip))
		sc := startSidecar(t, bin, kubeconfig, p, ip)
		waitReady(t, sc)
		return sc, dialApp(t, name, ip)
	}

	// Three members exchange lines on a Broadcast channel, every way.
	_, a := run("pod-a", podIP(1))
	_, b := run("pod-b", podIP(2))
	cProc, c := run("pod-c", podIP(3))
	apps := []*app{a, b, c}
	meshUp(t, apps)
	for _, from := range apps {
		line := "broadcast from " + from.name
		from.send(t, line)
		for _, to := range others(apps, from) {
			to.expect(t, line)
		}
	}

	// A new pod joins and starts receiving (and sending).
	_, d := run("pod-d", podIP(4))
	apps = append(apps, d)
	meshUp(t, apps)
	a.send(t, "welcome d")
	for _, to := range others(apps, a) {
		to.expect(t, "welcome d")
	}

	// A pod is deleted: its peers stop sending to it (and stop taking its lines).
	cPod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "pod-c"}}
	if err := env.Client.Delete(t.Context(), cPod); err != nil {
		t.Fatal(err)
	}
	apps = []*app{a, b, d}
	testenv.Eventually(t, "pod-c stops receiving", func() error {
		line := "after c left " + rand.String(4)
		a.send(t, line)
		b.expect(t, line)
		d.expect(t, line)
		if c.receives(line, 500*time.Millisecond) {
			return fmt.Errorf("pod-c still received %q", line)
		}
		return nil
	})
	a.send(t, "c is gone")
	b.expect(t, "c is gone")
	d.expect(t, "c is gone")
	c.expectNothing(t, time.Second)
	cProc.stop(t)

	// The API server goes away and comes back: the sidecars keep their members and their
	// links, and lines flow during the outage and after it.
	if err := env.RestartAPIServer(func() {
		for _, from := range apps {
			line := "during the outage from " + from.name
			from.send(t, line)
			for _, to := range others(apps, from) {
				to.expect(t, line)
			}
		}
	}); err != nil {
		t.Fatal(err)
	}
	for _, from := range apps {
		line := "after the outage from " + from.name
		from.send(t, line)
		for _, to := range others(apps, from) {
			to.expect(t, line)
		}
	}

	// The Channel is edited to AnyOne: applied live, each line now reaches one pod, in
	// turn. Lines sent while the edit propagates may still be broadcast, so the check
	// waits for one line to reach a single pod first.
	if err := env.Client.Get(t.Context(), client.ObjectKeyFromObject(ch), ch); err != nil {
		t.Fatal(err)
	}
	ch.Spec.Delivery = podipcv1alpha1.DeliveryAnyOne
	if err := env.Client.Update(t.Context(), ch); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "AnyOne delivery", func() error {
		line := "anyone probe " + rand.String(4)
		a.send(t, line)
		if n := receivers([]*app{b, d}, line, 500*time.Millisecond); n != 1 {
			return fmt.Errorf("%q reached %d pods", line, n)
		}
		return nil
	})
	got := map[string]int{}
	for i := range 6 {
		line := fmt.Sprintf("anyone %d", i)
		a.send(t, line)
		var to []string
		for _, r := range []*app{b, d} {
			if r.receives(line, 300*time.Millisecond) {
				to = append(to, r.name)
				got[r.name]++
			}
		}
		if len(to) != 1 {
			t.Fatalf("AnyOne line %q reached %v, want exactly one pod", line, to)
		}
	}
	if got["pod-b"] == 0 || got["pod-d"] == 0 {
		t.Errorf("AnyOne lines reached %v, want both pods in turn", got)
	}
}

// podIP returns the i-th test pod IP, in testenv.PodCIDR.
func podIP(i int) string { return fmt.Sprintf("10.244.7.%d", i) }

func buildSidecar(t testing.TB) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "podipc-sidecar")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/podipc/podipc/cmd/podipc-sidecar").CombinedOutput(); err != nil {
		t.Fatalf("building the sidecar: %v\n%s", err, out)
	}
	return bin
}

// sidecarProc is a running podipc-sidecar.
type sidecarProc struct {
	name, ip string
	cmd      *exec.Cmd
	done     chan struct{}
	once     sync.Once
}

// startSidecar runs the sidecar of pod p on ip, as the injected container would (its
// environment from the downward API), and stops it at the end of the test.
func startSidecar(t testing.TB, bin, kubeconfig string, p *corev1.Pod, ip string) *sidecarProc {
	t.Helper()
	dir, err := os.MkdirTemp("", "pk") // short: node-ipc socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	cmd := exec.Command(bin, "--discovery=kubernetes", "--kubeconfig="+kubeconfig, "--log-level=debug",
		"--app-address="+ip, "--socket-dir="+dir, "--drain-timeout=1s")
	cmd.Env = append(os.Environ(), "PODIPC_POD_NAMESPACE="+p.Namespace, "PODIPC_POD_NAME="+p.Name,
		"PODIPC_POD_UID="+string(p.UID), "PODIPC_POD_IP="+ip, "PODIPC_CHANNELS=talk")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // never outlive the test binary
	logf, err := os.Create(filepath.Join(dir, "sidecar.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := &sidecarProc{name: p.Name, ip: ip, cmd: cmd, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		_ = logf.Close()
		close(sc.done)
	}()
	t.Cleanup(func() {
		sc.stop(t)
		if t.Failed() {
			out, _ := os.ReadFile(logf.Name())
			t.Logf("log of the sidecar of %s:\n%s", p.Name, out)
		}
	})
	return sc
}

// stop sends SIGTERM and waits for the sidecar to exit (SIGKILL after 10 s).
func (sc *sidecarProc) stop(t testing.TB) {
	sc.once.Do(func() {
		_ = sc.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-sc.done:
		case <-time.After(10 * time.Second):
			t.Errorf("the sidecar of %s did not stop within 10s of SIGTERM", sc.name)
			_ = sc.cmd.Process.Kill()
			<-sc.done
		}
	})
}

func waitReady(t testing.TB, sc *sidecarProc) {
	t.Helper()
	url := "http://" + net.JoinHostPort(sc.ip, "7702") + "/readyz"
	testenv.Eventually(t, "the sidecar of "+sc.name+" ready", func() error {
		select {
		case <-sc.done:
			t.Fatalf("the sidecar of %s exited", sc.name)
		default:
		}
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, url, nil)
		req.Close = true // no idle connection (and its goroutines) outlives the check
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return err
		}
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %s", url, resp.Status)
		}
		return nil
	})
}

// app is an application connection on a pod's line port.
type app struct {
	name  string
	conn  net.Conn
	lines chan string
}

func dialApp(t testing.TB, name, ip string) *app {
	t.Helper()
	addr := net.JoinHostPort(ip, fmt.Sprint(talkPort))
	a := &app{name: name, lines: make(chan string, 1024)}
	testenv.Eventually(t, "dialing "+addr, func() error {
		var d net.Dialer
		c, err := d.DialContext(t.Context(), "tcp", addr)
		a.conn = c
		return err
	})
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(a.conn)
		for sc.Scan() {
			a.lines <- sc.Text()
		}
	}()
	t.Cleanup(func() {
		_ = a.conn.Close()
		<-done
	})
	return a
}

func (a *app) send(t testing.TB, line string) {
	t.Helper()
	_ = a.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintln(a.conn, line); err != nil {
		t.Fatalf("%s sending %q: %v", a.name, line, err)
	}
}

// receives reports whether line arrives within d, skipping the mesh probes.
func (a *app) receives(line string, d time.Duration) bool {
	deadline := time.After(d)
	for {
		select {
		case l := <-a.lines:
			// Other lines are mesh probes or lines that arrived after an earlier
			// wait gave up on them; the checks that cared have decided already.
			if l == line {
				return true
			}
		case <-deadline:
			return false
		}
	}
}

func (a *app) expect(t testing.TB, line string) {
	t.Helper()
	if !a.receives(line, 10*time.Second) {
		t.Fatalf("%s did not receive %q within 10s", a.name, line)
	}
}

// expectNothing fails on any line other than a mesh probe within d.
func (a *app) expectNothing(t testing.TB, d time.Duration) {
	t.Helper()
	deadline := time.After(d)
	for {
		select {
		case l := <-a.lines:
			if !strings.HasPrefix(l, "probe ") {
				t.Fatalf("%s received %q, want nothing", a.name, l)
			}
		case <-deadline:
			return
		}
	}
}

// meshUp waits until a line from every app reaches every other: the peer links come up
// asynchronously, after each sidecar has seen the other members' EndpointSlice entries.
func meshUp(t testing.TB, apps []*app) {
	t.Helper()
	for _, from := range apps {
		for _, to := range others(apps, from) {
			testenv.Eventually(t, "a line from "+from.name+" reaching "+to.name, func() error {
				line := "probe " + from.name + " " + rand.String(6)
				from.send(t, line)
				if !to.receives(line, 300*time.Millisecond) {
					return fmt.Errorf("%q did not arrive", line)
				}
				return nil
			})
		}
	}
}

// receivers counts the apps that receive line within d.
func receivers(apps []*app, line string, d time.Duration) int {
	n := 0
	for _, a := range apps {
		if a.receives(line, d) {
			n++
		}
	}
	return n
}

func others(apps []*app, self *app) []*app {
	var out []*app
	for _, a := range apps {
		if a != self {
			out = append(out, a)
		}
	}
	return out
}

// writeKubeconfig writes a kubeconfig for the test API server that acts as user.
func writeKubeconfig(t testing.TB, user string) string {
	t.Helper()
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["test"] = &clientcmdapi.Cluster{Server: env.Config.Host, CertificateAuthorityData: env.Config.CAData}
	cfg.AuthInfos["test"] = &clientcmdapi.AuthInfo{ClientCertificateData: env.Config.CertData, ClientKeyData: env.Config.KeyData, Impersonate: user}
	cfg.Contexts["test"] = &clientcmdapi.Context{Cluster: "test", AuthInfo: "test"}
	cfg.CurrentContext = "test"
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		t.Fatal(err)
	}
	return path
}

// BenchmarkSidecarIdleRSS measures the resident memory of podipc-sidecar in Kubernetes
// mode, idle, serving one channel with one peer (two sidecars, each with one app
// connection), after the links are up and a few seconds have passed. Run it once:
//
//	KUBEBUILDER_ASSETS=$PWD/bin/k8s/v1.37.2 go test -run '^$' -bench SidecarIdleRSS -benchtime 1x ./pkg/discovery/kube/
func BenchmarkSidecarIdleRSS(b *testing.B) {
	bin := buildSidecar(b)
	// Start from a binary that is not in the page cache, so that its pages come in through
	// page faults the same way on every run. How much of the binary a fault maps depends
	// on how it entered the page cache (what is cached in large folios gets mapped more
	// widely), which otherwise moved RssFile by about 1 MiB from one run to the next.
	if err := dropFromPageCache(bin); err != nil {
		b.Fatal(err)
	}
	ns := "b-" + rand.String(8)
	if err := env.Client.Create(b.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
		b.Fatal(err)
	}
	ch := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "talk"}, Spec: podipcv1alpha1.ChannelSpec{LocalPort: talkPort}}
	if err := env.Client.Create(b.Context(), ch); err != nil {
		b.Fatal(err)
	}
	kubeconfig := writeKubeconfig(b, "system:serviceaccount:"+ns+":default")
	var procs []*sidecarProc
	var apps []*app
	for i, name := range []string{"pod-a", "pod-b"} {
		ip := podIP(20 + i)
		sc := startSidecar(b, bin, kubeconfig, addPod(b, sidecarPod(ns, name, "talk", ip)), ip)
		waitReady(b, sc)
		procs = append(procs, sc)
		apps = append(apps, dialApp(b, name, ip))
	}
	meshUp(b, apps)
	for range b.N {
		time.Sleep(5 * time.Second) // idle: keepalives only
	}
	b.StopTimer()
	var worst map[string]float64
	for _, sc := range procs {
		m, err := procMemory(sc.cmd.Process.Pid)
		if err != nil {
			b.Fatal(err)
		}
		if worst == nil || m["VmRSS"] > worst["VmRSS"] {
			worst = m
		}
	}
	// The sidecar with the larger RSS; RssFile is the binary's mapped pages, RssAnon the
	// heap and stacks.
	for _, k := range []string{"VmRSS", "RssAnon", "RssFile", "VmHWM"} {
		b.ReportMetric(worst[k]/(1<<20), k+"-MiB")
	}
}

// dropFromPageCache evicts the file at path from the page cache.
func dropFromPageCache(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	return unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
}

// procMemory returns the memory figures (kB lines) of /proc/<pid>/status, in bytes.
func procMemory(pid int) (map[string]float64, error) {
	out, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil, err
	}
	m := map[string]float64{}
	for line := range strings.SplitSeq(string(out), "\n") {
		var key string
		var kb float64
		if _, err := fmt.Sscanf(line, "%s %g kB", &key, &kb); err == nil {
			m[strings.TrimSuffix(key, ":")] = kb * 1024
		}
	}
	if m["VmRSS"] == 0 {
		return nil, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
	}
	return m, nil
}

// noLeaks fails the test if, once its cleanups have run, a goroutine started during the
// test is left whose stack runs podipc code (the test's app readers and process waiters,
// kube.Source). The controller running in this process renews its own goroutines
// across an API server restart, which is why goleak's all-goroutine check cannot be used.
func noLeaks(t *testing.T) {
	before := goroutineStacks()
	t.Cleanup(func() { // registered first, so it runs last
		var left []string
		for range 50 {
			left = left[:0]
			for id, stack := range goroutineStacks() {
				if _, ok := before[id]; !ok && strings.Contains(stack, "github.com/podipc/podipc/") && !strings.Contains(stack, "noLeaks") {
					left = append(left, stack)
				}
			}
			if len(left) == 0 {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		slices.Sort(left)
		t.Errorf("%d goroutines left running:\n%s", len(left), strings.Join(left, "\n\n"))
	})
}

var goroutineHeader = regexp.MustCompile(`^goroutine (\d+) `)

// goroutineStacks returns the stack of every goroutine, by goroutine id.
func goroutineStacks() map[string]string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	out := map[string]string{}
	for g := range strings.SplitSeq(string(buf), "\n\n") {
		if m := goroutineHeader.FindStringSubmatch(g); m != nil {
			out[m[1]] = g
		}
	}
	return out
}
