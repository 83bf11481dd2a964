package issuer_test

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/rand"
	"k8s.io/utils/ptr"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/internal/testenv"
	"github.com/podipc/podipc/pkg/identity"
)

// mtlsPort is the line port (Channel localPort) of TestSidecarsOverMTLS's channel.
const mtlsPort = 7431

// TestSidecarsOverMTLS runs real podipc-sidecar processes in Kubernetes mode with an
// identity URL and no --peer-tls, so mutual TLS Required by default: each obtains its workload certificate from
// the real issuer (TokenReview against the real API server) and presents it on its peer
// port. Two members exchange lines over mutual TLS, and a plaintext peer is refused. Then an EndpointSlice says member D
// lives where pod C's sidecar listens (a recycled IP): C's sidecar holds a valid
// certificate from the same root, for C, so the members refuse the link to "D" — counted
// as podipc_peer_outbound_refused_total{reason="identity"} — and keep exchanging lines.
func TestSidecarsOverMTLS(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "podipc-sidecar")
	if out, err := exec.CommandContext(t.Context(), "go", "build", "-o", bin, "github.com/podipc/podipc/cmd/podipc-sidecar").CombinedOutput(); err != nil {
		t.Fatalf("building the sidecar: %v\n%s", err, out)
	}
	kubeconfig, err := env.WriteKubeconfig(dir, "mtls-sidecars")
	if err != nil {
		t.Fatal(err)
	}
	podA := member(t, nil)
	ns := podA.Namespace
	podB, podC, podD := podIn(t, ns, "app", nil), podIn(t, ns, "app", nil), podIn(t, ns, "app", nil)
	ch := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "orders"},
		Spec: podipcv1alpha1.ChannelSpec{LocalPort: mtlsPort, Delivery: podipcv1alpha1.DeliveryBroadcast}}
	if err := env.Client.Create(t.Context(), ch); err != nil {
		t.Fatal(err)
	}
	// Pod addresses (testenv.PodCIDR), so that source-address checks see distinct pods.
	ip := func(i int) string { return fmt.Sprintf("10.244.9.%d", i) }
	a := startMTLSSidecar(t, bin, kubeconfig, dir, podA, ip(1))
	b := startMTLSSidecar(t, bin, kubeconfig, dir, podB, ip(2))
	publish(t, ch, podA, a)
	publish(t, ch, podB, b)

	appA, appB := dialLinePort(t, a), dialLinePort(t, b)
	exchange := func(what string) {
		t.Helper()
		testenv.Eventually(t, what, func() error {
			line := what + " " + rand.String(6)
			appA.send(t, line)
			if !appB.receives(line, time.Second) {
				return fmt.Errorf("B did not receive %q", line)
			}
			line = what + " back " + rand.String(6)
			appB.send(t, line)
			if !appA.receives(line, time.Second) {
				return fmt.Errorf("A did not receive %q", line)
			}
			return nil
		})
	}
	exchange("lines over mTLS")
	for _, sc := range []*mtlsSidecar{a, b} {
		if !sc.logged("Peer links use mutual TLS with the workload certificate") {
			t.Fatalf("the sidecar of %s does not say its peer links use the workload certificate", sc.pod.Name)
		}
	}

	// Required means TLS only: a plaintext peer is refused, and counted.
	conn, err := net.Dial("tcp", net.JoinHostPort(a.ip, strconv.Itoa(a.peerPort)))
	if err != nil {
		t.Fatal(err)
	}
	_, _ = conn.Write([]byte{0, 0, 0, 8})
	_ = conn.Close()
	testenv.Eventually(t, "A refuses a plaintext peer", func() error {
		v, err := a.metric(`podipc_peer_refused_total{reason="plaintext"}`)
		if err != nil {
			return err
		}
		if v < 1 {
			return fmt.Errorf("refused %v times", v)
		}
		return nil
	})

	// C's sidecar, with C's own certificate, is published as member D.
	c := startMTLSSidecar(t, bin, kubeconfig, dir, podC, ip(3))
	publish(t, ch, podD, c)
	for _, sc := range []*mtlsSidecar{a, b} {
		testenv.Eventually(t, "the sidecar of "+sc.pod.Name+" refuses C's certificate for D", func() error {
			v, err := sc.metric(`podipc_peer_outbound_refused_total{reason="identity"}`)
			if err != nil {
				return err
			}
			if v < 1 {
				return fmt.Errorf("refused %v times", v)
			}
			return nil
		})
	}
	if !a.logged("Refused peer: its certificate failed verification", podD.Name, string(podD.UID)) {
		t.Fatal("A's log does not name the refused peer D")
	}
	appC := dialLinePort(t, c)
	exchange("lines after the impostor")
	// C is no member of theirs: nothing A or B sends reaches it.
	if appC.receives("lines after the impostor", 0) {
		t.Fatal("unreachable")
	}
}

// mtlsSidecar is a running sidecar of TestSidecarsOverMTLS.
type mtlsSidecar struct {
	pod             *corev1.Pod
	ip              string
	peerPort, admin int
	log             string
}

// startMTLSSidecar runs the sidecar of pod on ip as the webhook would configure it, with
// a projected identity token and no --peer-tls: Required is the default with an identity URL.
func startMTLSSidecar(t *testing.T, bin, kubeconfig, dir string, pod *corev1.Pod, ip string) *mtlsSidecar {
	t.Helper()
	return startMTLSSidecarVia(t, bin, kubeconfig, dir, pod, ip, endpoint, trustCM)
}

// startMTLSSidecarVia is startMTLSSidecar against the identity endpoint url, with the trust
// bundle in ConfigMap cm, and extra flags.
func startMTLSSidecarVia(t *testing.T, bin, kubeconfig, dir string, pod *corev1.Pod, ip, url string, cm types.NamespacedName, extra ...string) *mtlsSidecar {
	t.Helper()
	sc := &mtlsSidecar{pod: pod, ip: ip, peerPort: freePortOn(t, ip), admin: freePortOn(t, ip),
		log: filepath.Join(dir, pod.Name+".log")}
	tokenFile := filepath.Join(dir, pod.Name+".token")
	if err := os.WriteFile(tokenFile, []byte(tokenFor(t, pod, identity.Audience)), 0o600); err != nil {
		t.Fatal(err)
	}
	sock, err := os.MkdirTemp("", "pm") // short: socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(sock) })
	args := append([]string{"--discovery=kubernetes", "--kubeconfig=" + kubeconfig,
		"--peer-address=" + net.JoinHostPort(ip, strconv.Itoa(sc.peerPort)), "--admin-address=" + net.JoinHostPort(ip, strconv.Itoa(sc.admin)),
		"--app-address=" + ip, "--socket-dir=" + sock, "--drain-timeout=1s", "--identity-token-file=" + tokenFile, "--log-level=debug"}, extra...)
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "PODIPC_POD_NAMESPACE="+pod.Namespace, "PODIPC_POD_NAME="+pod.Name,
		"PODIPC_POD_UID="+string(pod.UID), "PODIPC_POD_IP="+ip, "PODIPC_CHANNELS=orders",
		"PODIPC_IDENTITY_URL="+url, "PODIPC_TRUST_DOMAIN="+trustDomain,
		"PODIPC_TRUST_BUNDLE="+cm.Namespace+"/"+cm.Name)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	logf, err := os.Create(sc.log)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
		_ = logf.Close()
		if t.Failed() {
			out, _ := os.ReadFile(sc.log)
			t.Logf("log of the sidecar of %s:\n%s", pod.Name, out)
		}
	})
	return sc
}

// logged reports whether one line of the sidecar's log holds every part.
func (sc *mtlsSidecar) logged(parts ...string) bool {
	out, _ := os.ReadFile(sc.log)
	for _, l := range strings.Split(string(out), "\n") {
		all := true
		for _, p := range parts {
			all = all && strings.Contains(l, p)
		}
		if all {
			return true
		}
	}
	return false
}

// metric returns the value of the series (name with its labels) in the sidecar's /metrics.
func (sc *mtlsSidecar) metric(series string) (float64, error) {
	req, _ := http.NewRequest(http.MethodGet, "http://"+net.JoinHostPort(sc.ip, strconv.Itoa(sc.admin))+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer func() { _ = resp.Body.Close() }()
	return metricValue(resp.Body, series)
}

// publish writes the EndpointSlice the controller would for pod, found at sc's address.
func publish(t *testing.T, ch *podipcv1alpha1.Channel, pod *corev1.Pod, sc *mtlsSidecar) {
	t.Helper()
	es := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: ch.Namespace, Name: "orders-" + pod.Name,
			Labels: map[string]string{podipcv1alpha1.ChannelLabel: ch.Name, discoveryv1.LabelManagedBy: podipcv1alpha1.ManagedBy},
			OwnerReferences: []metav1.OwnerReference{{
				APIVersion: podipcv1alpha1.GroupVersion.String(), Kind: "Channel", Name: ch.Name, UID: ch.UID, Controller: ptr.To(true),
			}},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{sc.ip},
			TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID}}},
		Ports: []discoveryv1.EndpointPort{{Name: ptr.To(podipcv1alpha1.PeerPortName), Port: ptr.To(int32(sc.peerPort)), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
	if err := env.Client.Create(t.Context(), es); err != nil {
		t.Fatal(err)
	}
}

// lineApp is an app connected to a sidecar's line port.
type lineApp struct {
	conn  net.Conn
	lines chan string
}

func dialLinePort(t *testing.T, sc *mtlsSidecar) *lineApp {
	t.Helper()
	a := &lineApp{lines: make(chan string, 1024)}
	addr := net.JoinHostPort(sc.ip, strconv.Itoa(mtlsPort))
	testenv.Eventually(t, "dialing "+addr, func() error {
		var d net.Dialer
		c, err := d.DialContext(t.Context(), "tcp", addr)
		a.conn = c
		return err
	})
	go func() {
		sc := bufio.NewScanner(a.conn)
		for sc.Scan() {
			a.lines <- sc.Text()
		}
	}()
	t.Cleanup(func() { _ = a.conn.Close() })
	return a
}

func (a *lineApp) send(t *testing.T, line string) {
	t.Helper()
	_ = a.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintln(a.conn, line); err != nil {
		t.Fatalf("sending %q: %v", line, err)
	}
}

// receives reports whether line arrives within d, skipping others.
func (a *lineApp) receives(line string, d time.Duration) bool {
	deadline := time.After(d)
	for {
		select {
		case l := <-a.lines:
			if l == line {
				return true
			}
		case <-deadline:
			return false
		}
	}
}

func freePortOn(t *testing.T, ip string) int {
	t.Helper()
	var lc net.ListenConfig
	ln, err := lc.Listen(t.Context(), "tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	return ln.Addr().(*net.TCPAddr).Port
}
