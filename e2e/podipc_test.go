//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"
	ctrlclient "sigs.k8s.io/controller-runtime/pkg/client"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
)

// The journey of the README ("The user journey") on the real node, through what a user uses: helm, the API.
const (
	release        = "podipc"
	releaseNS      = "podipc-system"
	webhookConfig  = "podipc-injector"
	controllerName = "podipc-controller"
	// journeyTimeout bounds every wait of the journey: rollouts, delivery, membership. Two
	// shared cores start five injected pods slowly; nothing here is a timing assertion.
	journeyTimeout = 4 * time.Minute
	// lines is how many numbered lines each talk pod sends on each channel.
	lines = 20
)

// talkArgs runs testapp talk against the Broadcast channel "chat" (port 7000) and the AnyOne
// channel "work" (port 7001), expecting 3 peers.
var talkArgs = []string{"talk", "127.0.0.1:7000", "127.0.0.1:7001", "3", strconv.Itoa(lines)}

// TestPodipcJourney installs the chart and walks the user journey in order; each step needs
// the ones before it, so a failed step ends the journey (the uninstall still runs).
func TestPodipcJourney(t *testing.T) {
	kube := newCRClient(t)
	// The users' namespace lives for the whole journey: the uninstall checks its Channels stay.
	j := &journey{kube: kube, ns: newNamespace(t, nil)}
	steps := []struct {
		name string
		run  func(*testing.T)
	}{
		{"HelmInstall", j.helmInstall},
		{"HelmTest", j.helmTest},
		{"Channels", j.channels},
		{"BroadcastReachesEveryReplicaInOrder", j.broadcast},
		{"AnyOneSpreadsLinesExactlyOnce", j.anyOne},
		{"SidecarMetricsCountTraffic", j.metrics},
		{"PeerLinksRequireMutualTLS", j.mtls},
		{"MembershipFollowsScale", j.scale},
		{"NodeIPCAppTalksWithLineApps", j.nodeIPC},
		{"InjectedJobCompletes", j.job},
		{"PodSecurityRestrictedAdmitsInjectedPod", j.restricted},
		{"HelmUpgradeKeepsInjection", j.helmUpgrade},
		{"HelmUninstallLeavesOnlyCRDAndChannels", j.helmUninstall},
	}
	t.Cleanup(func() {
		if !j.uninstalled {
			_, _ = helm(context.Background(), "uninstall", release, "-n", releaseNS, "--wait", "--timeout", "3m")
		}
	})
	for _, s := range steps {
		if !t.Run(s.name, s.run) {
			return
		}
	}
}

// journey is the state the steps share.
type journey struct {
	kube        ctrlclient.Client
	ns          string
	talkPods    []string
	uninstalled bool
}

func newCRClient(t *testing.T) ctrlclient.Client {
	t.Helper()
	cfg, err := clientcmd.BuildConfigFromFlags("", os.Getenv("PODIPC_E2E_KUBECONFIG"))
	if err != nil {
		t.Fatal(err)
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	if err := podipcv1alpha1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	c, err := ctrlclient.New(cfg, ctrlclient.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// helm runs the pinned bin/helm against the e2e cluster from the module root.
func helm(ctx context.Context, args ...string) (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, filepath.Join(root, "bin", "helm"), args...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "KUBECONFIG="+os.Getenv("PODIPC_E2E_KUBECONFIG"),
		"HELM_CACHE_HOME="+filepath.Join(os.TempDir(), "podipc-e2e-helm", "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(os.TempDir(), "podipc-e2e-helm", "config"),
		"HELM_DATA_HOME="+filepath.Join(os.TempDir(), "podipc-e2e-helm", "data"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("helm %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

func mustHelm(t *testing.T, args ...string) string {
	t.Helper()
	out, err := helm(t.Context(), args...)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("helm %s:\n%s", args[0], out)
	return out
}

// eventually polls cond until it holds, failing with what and the last state it reported.
func eventually(t *testing.T, what string, cond func(ctx context.Context) (bool, string, error)) {
	t.Helper()
	var last string
	err := wait.PollUntilContextTimeout(t.Context(), time.Second, journeyTimeout, true, func(ctx context.Context) (bool, error) {
		ok, state, err := cond(ctx)
		last = state
		return ok, err
	})
	if err != nil {
		t.Fatalf("%s: %v\nlast state: %s", what, err, last)
	}
}

// chartValues are the values of the e2e release: the imported image, never pulled. One
// controller replica: on a two-core node shared with other suites a second replica only adds
// a process that starts, loses the election and serves the same webhook.
var chartValues = []string{
	"--set", "image.repository=" + podipcRepository,
	"--set", "image.tag=" + podipcVersion,
	"--set", "image.pullPolicy=Never",
	"--set", "webhook.certMode=self",
	"--set", "controller.replicas=1",
}

func (j *journey) helmInstall(t *testing.T) {
	args := append([]string{"install", release, "charts/podipc", "-n", releaseNS, "--create-namespace",
		"--wait", "--timeout", journeyTimeout.String()}, chartValues...)
	mustHelm(t, args...)
	j.waitControllerReady(t)
	j.waitCABundle(t)
}

func (j *journey) waitControllerReady(t *testing.T) {
	t.Helper()
	eventually(t, "controller Deployment never Ready", func(ctx context.Context) (bool, string, error) {
		var d appsv1.Deployment
		if err := j.kube.Get(ctx, ctrlclient.ObjectKey{Namespace: releaseNS, Name: controllerName}, &d); err != nil {
			return false, err.Error(), client(err)
		}
		s := d.Status
		return s.ObservedGeneration == d.Generation && s.UpdatedReplicas == *d.Spec.Replicas &&
			s.ReadyReplicas == *d.Spec.Replicas && s.Replicas == *d.Spec.Replicas, fmt.Sprintf("%+v", s), nil
	})
}

func (j *journey) waitCABundle(t *testing.T) {
	t.Helper()
	eventually(t, "webhook caBundle never set", func(ctx context.Context) (bool, string, error) {
		var m admissionMutating
		if err := j.kube.Get(ctx, ctrlclient.ObjectKey{Name: webhookConfig}, &m); err != nil {
			return false, err.Error(), client(err)
		}
		if len(m.Webhooks) == 0 {
			return false, "no webhooks", nil
		}
		for _, w := range m.Webhooks {
			if len(w.ClientConfig.CABundle) == 0 {
				return false, "webhook " + w.Name + " has no caBundle", nil
			}
		}
		return true, "", nil
	})
}

func (j *journey) helmTest(t *testing.T) {
	mustHelm(t, "test", release, "-n", releaseNS, "--timeout", journeyTimeout.String())
}

func (j *journey) channels(t *testing.T) {
	createChannels(t, j.kube, j.ns)
}

func createChannels(t *testing.T, kube ctrlclient.Client, ns string) {
	t.Helper()
	for _, ch := range []*podipcv1alpha1.Channel{
		{
			ObjectMeta: metav1.ObjectMeta{Name: "chat", Namespace: ns},
			Spec:       podipcv1alpha1.ChannelSpec{LocalPort: 7000, Delivery: podipcv1alpha1.Delivery("Broadcast")},
		},
		{
			// The longest overflow wait: a line sent before a peer's connection is advertised
			// waits for it instead of being dropped as no_receiver.
			ObjectMeta: metav1.ObjectMeta{Name: "work", Namespace: ns},
			Spec: podipcv1alpha1.ChannelSpec{LocalPort: 7001, Delivery: podipcv1alpha1.Delivery("AnyOne"),
				Overflow: podipcv1alpha1.Overflow{MaxWait: &metav1.Duration{Duration: 10 * time.Second}}},
		},
	} {
		if err := kube.Create(t.Context(), ch); err != nil {
			t.Fatalf("create Channel %s: %v", ch.Name, err)
		}
	}
}

// injectedTemplate is a pod template annotated for injection into channels.
func injectedTemplate(name, channels string, args ...string) corev1.PodTemplateSpec {
	p := testappPod(name, args...)
	p.Annotations = map[string]string{"podipc.dev/inject": "true", "podipc.dev/channels": channels}
	// The sidecar flushes and says goodbye on SIGTERM; give it the time it asks for.
	p.Spec.TerminationGracePeriodSeconds = ptr.To[int64](10)
	return corev1.PodTemplateSpec{ObjectMeta: p.ObjectMeta, Spec: p.Spec}
}

// checkInjected fails unless the pod carries the native sidecar and the injected label.
func checkInjected(t *testing.T, p *corev1.Pod) {
	t.Helper()
	if p.Labels["podipc.dev/injected"] != "true" {
		t.Errorf("pod %s: no podipc.dev/injected label: %v", p.Name, p.Labels)
	}
	if len(p.Spec.InitContainers) == 0 || p.Spec.InitContainers[0].Name != "podipc-sidecar" ||
		p.Spec.InitContainers[0].RestartPolicy == nil || *p.Spec.InitContainers[0].RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Errorf("pod %s: first init container is not the native podipc-sidecar: %+v", p.Name, p.Spec.InitContainers)
	}
}

// podLogs returns the logs of container in pod ns/name ("" while there are none).
func podLogs(ctx context.Context, ns, name, container string) string {
	b, err := clientset.CoreV1().Pods(ns).GetLogs(name, &corev1.PodLogOptions{Container: container}).DoRaw(ctx)
	if err != nil {
		return ""
	}
	return string(b)
}

// received parses the "recv KIND FROM SEQ" lines of a talk pod's log.
func received(logs, kind string) map[string][]int {
	got := map[string][]int{}
	sc := bufio.NewScanner(strings.NewReader(logs))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 4 || f[0] != "recv" || f[1] != kind {
			continue
		}
		n, err := strconv.Atoi(f[3])
		if err != nil {
			continue
		}
		got[f[2]] = append(got[f[2]], n)
	}
	return got
}

func seq(n int) []int {
	s := make([]int, n)
	for i := range s {
		s[i] = i + 1
	}
	return s
}

func (j *journey) listPods(ctx context.Context, app string) ([]corev1.Pod, error) {
	var pods corev1.PodList
	err := j.kube.List(ctx, &pods, ctrlclient.InNamespace(j.ns), ctrlclient.MatchingLabels{"app": app})
	return pods.Items, err
}

func (j *journey) broadcast(t *testing.T) {
	deploy := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "talk", Namespace: j.ns},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr.To[int32](3),
			Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "talk"}},
			Template: injectedTemplate("talk", "chat,work", talkArgs...),
		},
	}
	if err := j.kube.Create(t.Context(), deploy); err != nil {
		t.Fatal(err)
	}
	j.waitReplicas(t, 3)
	pods, err := j.listPods(t.Context(), "talk")
	if err != nil {
		t.Fatal(err)
	}
	j.talkPods = nil
	for i := range pods {
		checkInjected(t, &pods[i])
		j.talkPods = append(j.talkPods, pods[i].Name)
	}
	slices.Sort(j.talkPods)
	// Every replica hears every other replica's lines, all of them, each once, in order.
	for _, name := range j.talkPods {
		eventually(t, "pod "+name+" never received every peer's lines", func(ctx context.Context) (bool, string, error) {
			logs := podLogs(ctx, j.ns, name, "app")
			got := received(logs, "data")
			for _, from := range j.talkPods {
				if from != name && len(got[from]) < lines {
					return false, fmt.Sprintf("received %v\nlogs:\n%s%s", got, logs, j.sidecarLogs(ctx, name)), nil
				}
			}
			return true, "", nil
		})
		logs := podLogs(t.Context(), j.ns, name, "app")
		got := received(logs, "data")
		for _, from := range j.talkPods {
			want := []int(nil)
			if from != name {
				want = seq(lines)
			}
			if !slices.Equal(got[from], want) {
				t.Errorf("pod %s received from %s %v, want %v (in order, once each)", name, from, got[from], want)
			}
		}
	}
	j.checkNoRestarts(t)
}

// sidecarLogs is the tail of a pod's sidecar log, for failure messages.
func (j *journey) sidecarLogs(ctx context.Context, pod string) string {
	logs := podLogs(ctx, j.ns, pod, "podipc-sidecar")
	if lines := strings.Split(logs, "\n"); len(lines) > 30 {
		logs = strings.Join(lines[len(lines)-30:], "\n")
	}
	return "\nsidecar logs of " + pod + ":\n" + logs
}

// checkNoRestarts fails if a talk container restarted: its lost connection would explain
// missing lines and must not pass unnoticed.
func (j *journey) checkNoRestarts(t *testing.T) {
	t.Helper()
	pods, err := j.listPods(t.Context(), "talk")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pods {
		for _, c := range append(p.Status.InitContainerStatuses, p.Status.ContainerStatuses...) {
			if c.RestartCount > 0 {
				t.Errorf("pod %s container %s restarted %d times (last state %+v)", p.Name, c.Name, c.RestartCount, c.LastTerminationState)
			}
		}
	}
}

func (j *journey) waitReplicas(t *testing.T, n int32) {
	t.Helper()
	eventually(t, fmt.Sprintf("Deployment talk never had %d available replicas", n), func(ctx context.Context) (bool, string, error) {
		var d appsv1.Deployment
		if err := j.kube.Get(ctx, ctrlclient.ObjectKey{Namespace: j.ns, Name: "talk"}, &d); err != nil {
			return false, err.Error(), client(err)
		}
		pods, err := j.listPods(ctx, "talk")
		if err != nil {
			return false, err.Error(), err
		}
		s := d.Status
		return s.ObservedGeneration == d.Generation && s.AvailableReplicas == n && s.Replicas == n && len(pods) == int(n),
			fmt.Sprintf("status %+v, %d pods", s, len(pods)), nil
	})
}

func (j *journey) anyOne(t *testing.T) {
	var got map[string]int
	var receivers map[string]int
	eventually(t, "AnyOne lines never all arrived", func(ctx context.Context) (bool, string, error) {
		got, receivers = map[string]int{}, map[string]int{}
		total := 0
		for _, name := range j.talkPods {
			for from, seqs := range received(podLogs(ctx, j.ns, name, "app"), "any") {
				for _, s := range seqs {
					got[fmt.Sprintf("%s %d", from, s)]++
					receivers[name]++
					total++
				}
			}
		}
		return total >= len(j.talkPods)*lines, fmt.Sprintf("%d lines received, by receiver %v", total, receivers), nil
	})
	for _, from := range j.talkPods {
		for i := 1; i <= lines; i++ {
			if n := got[fmt.Sprintf("%s %d", from, i)]; n != 1 {
				t.Errorf("AnyOne line %d of %s received %d times, want exactly once", i, from, n)
			}
		}
	}
	if len(receivers) < 2 {
		t.Errorf("AnyOne lines all went to %v, want them spread over more than one replica", receivers)
	}
	t.Logf("AnyOne lines by receiver: %v", receivers)
}

// metricSum adds up every sample of the metric called name in a Prometheus text exposition.
func metricSum(text, name string) (float64, bool) {
	var sum float64
	found := false
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			continue
		}
		sum += v
		found = true
	}
	return sum, found
}

func (j *journey) metrics(t *testing.T) {
	pod := j.talkPods[0]
	var text string
	eventually(t, "sidecar /metrics never counted the traffic", func(ctx context.Context) (bool, string, error) {
		b, err := clientset.CoreV1().RESTClient().Get().
			AbsPath("/api/v1/namespaces", j.ns, "pods", pod+":7702", "proxy", "metrics").DoRaw(ctx)
		if err != nil {
			// The proxy fails while the admin server is not up yet; keep polling.
			return false, err.Error(), nil //nolint:nilerr // transient until the sidecar serves
		}
		text = string(b)
		in, _ := metricSum(text, "podipc_lines_in_total")
		out, _ := metricSum(text, "podipc_lines_out_total")
		peerIn, _ := metricSum(text, "podipc_peer_lines_received_total")
		// This pod sent lines data+any lines (and hellos); it wrote at least every peer's data lines.
		want := float64(2 * lines)
		return in >= want && out >= want && peerIn >= want,
			fmt.Sprintf("lines_in=%v lines_out=%v peer_lines_received=%v", in, out, peerIn), nil
	})
	if !strings.Contains(text, `podipc_build_info{version="`+podipcVersion+`"}`) {
		t.Errorf("podipc_build_info does not carry version %s:\n%s", podipcVersion, grepLines(text, "podipc_build_info"))
	}
	if d, _ := metricSum(text, "podipc_dropped_lines_total"); d != 0 {
		t.Logf("note: dropped lines counted: %s", grepLines(text, "podipc_dropped_lines_total"))
	}
}

func grepLines(text, prefix string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func (j *journey) scale(t *testing.T) {
	for _, n := range []int32{5, 2} {
		var d appsv1.Deployment
		if err := j.kube.Get(t.Context(), ctrlclient.ObjectKey{Namespace: j.ns, Name: "talk"}, &d); err != nil {
			t.Fatal(err)
		}
		d.Spec.Replicas = ptr.To(n)
		if err := j.kube.Update(t.Context(), &d); err != nil {
			t.Fatal(err)
		}
		j.waitReplicas(t, n)
		for _, channel := range []string{"chat", "work"} {
			j.waitMembers(t, channel, n)
			j.checkCLIMembers(t, channel)
		}
	}
	j.checkStream(t)
	j.checkNoRestarts(t)
}

// checkStream checks the hellos every talk pod sends twice a second for as long as it runs:
// once three of five members were deleted, the two survivors still hear each other (ten
// more hellos each way), and each heard the other's stream without a gap or a repeat from
// the first hello it received, through every membership change since.
func (j *journey) checkStream(t *testing.T) {
	t.Helper()
	pods, err := j.listPods(t.Context(), "talk")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range pods {
		names = append(names, p.Name)
	}
	last := func(ctx context.Context, to, from string) (int, []int) {
		got := received(podLogs(ctx, j.ns, to, "app"), "hello")[from]
		if len(got) == 0 {
			return 0, nil
		}
		return got[len(got)-1], got
	}
	for _, to := range names {
		for _, from := range names {
			if from == to {
				continue
			}
			base, _ := last(t.Context(), to, from)
			eventually(t, fmt.Sprintf("%s stopped hearing %s after the scale-down", to, from), func(ctx context.Context) (bool, string, error) {
				n, _ := last(ctx, to, from)
				return n >= base+10, fmt.Sprintf("last hello %d, was %d before%s", n, base, j.sidecarLogs(ctx, to)), nil
			})
			_, got := last(t.Context(), to, from)
			for i := 1; i < len(got); i++ {
				if got[i] != got[i-1]+1 {
					t.Errorf("%s heard %s's hellos %d then %d: lines lost or repeated between survivors", to, from, got[i-1], got[i])
				}
			}
		}
	}
}

// checkCLIMembers runs `podipc members CHANNEL` as a user does, with the admin kubeconfig,
// and wants one ready, non-terminating row per talk pod.
func (j *journey) checkCLIMembers(t *testing.T, channel string) {
	t.Helper()
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(t.Context(), "go", "run", "./cmd/podipc", "members", channel, "-n", j.ns,
		"--kubeconfig", os.Getenv("PODIPC_E2E_KUBECONFIG"))
	cmd.Dir = root
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("podipc members %s: %v\n%s", channel, err, out)
	}
	rows := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n")[1:] {
		if f := strings.Fields(line); len(f) == 5 {
			rows[f[0]] = f[3] + "/" + f[4]
		}
	}
	want := map[string]string{}
	for _, name := range j.survivors(t) {
		want[name] = "true/false"
	}
	if !maps.Equal(rows, want) {
		t.Errorf("podipc members %s: rows (ready/terminating) %v, want %v\n%s", channel, rows, want, out)
	}
}

// waitMembers waits until the channel's status and EndpointSlices list exactly the talk pods,
// n of them, all ready: what `kubectl get channels` and `podipc members` show.
func (j *journey) waitMembers(t *testing.T, channel string, n int32) {
	t.Helper()
	eventually(t, fmt.Sprintf("Channel %s never had %d ready members", channel, n), func(ctx context.Context) (bool, string, error) {
		var ch podipcv1alpha1.Channel
		if err := j.kube.Get(ctx, ctrlclient.ObjectKey{Namespace: j.ns, Name: channel}, &ch); err != nil {
			return false, err.Error(), client(err)
		}
		var slices discoveryv1.EndpointSliceList
		if err := j.kube.List(ctx, &slices, ctrlclient.InNamespace(j.ns), ctrlclient.MatchingLabels{"podipc.dev/channel": channel}); err != nil {
			return false, err.Error(), err
		}
		pods, err := j.listPods(ctx, "talk")
		if err != nil {
			return false, err.Error(), err
		}
		want := map[string]bool{}
		for _, p := range pods {
			want[p.Name] = true
		}
		ready := map[string]bool{}
		all := 0
		for _, s := range slices.Items {
			for _, e := range s.Endpoints {
				if e.TargetRef == nil {
					continue
				}
				all++
				if ptr.Deref(e.Conditions.Ready, false) && !ptr.Deref(e.Conditions.Terminating, false) {
					ready[e.TargetRef.Name] = true
				}
			}
		}
		state := fmt.Sprintf("status members=%d ready=%d; slices: %d endpoints, ready %v; pods %v",
			ch.Status.Members, ch.Status.ReadyMembers, all, ready, want)
		// The journey's other pods (the Job's) are members of chat too, but are gone by now.
		ok := ch.Status.Members == n && ch.Status.ReadyMembers == n && all == int(n) && len(ready) == int(n)
		for name := range want {
			ok = ok && ready[name]
		}
		return ok && len(want) == int(n), state, nil
	})
}

// nodeIPC runs a node-ipc 9.2.1 app on the Broadcast channel next to the talk pods: their
// hellos reach it as message events, and its events reach them as compact JSON lines.
func (j *journey) nodeIPC(t *testing.T) {
	if !haveNodeImage {
		t.Skip("no node-ipc image (Node.js or bin/npm/node-ipc-9.2.1 missing); see the setup output")
	}
	tmpl := injectedTemplate("nodeapp", "chat", "/app/app.cjs", "chat")
	tmpl.Spec.Containers[0].Image = nodeappImage
	pod := &corev1.Pod{ObjectMeta: tmpl.ObjectMeta, Spec: tmpl.Spec}
	pod.Name = "nodeapp"
	checkInjected(t, createPod(t, j.ns, pod))
	j.waitPodRunning(t, j.ns, "nodeapp")
	// The node-ipc app hears a talk pod's line "hello NAME HEARD SEQ" as its message data.
	talker := j.survivors(t)[0]
	j.waitLogContains(t, "nodeapp", "recv message hello "+talker+" ")
	// Each talk pod reads the node-ipc event as one JSON line.
	for _, name := range j.survivors(t) {
		j.waitLogContains(t, name, `recv {"type":"message","data":"node-ipc `)
	}
	if err := clientset.CoreV1().Pods(j.ns).Delete(t.Context(), "nodeapp", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
}

func (j *journey) survivors(t *testing.T) []string {
	t.Helper()
	pods, err := j.listPods(t.Context(), "talk")
	if err != nil || len(pods) == 0 {
		t.Fatalf("talk pods: %v (%d)", err, len(pods))
	}
	var names []string
	for _, p := range pods {
		names = append(names, p.Name)
	}
	slices.Sort(names)
	return names
}

// waitLogContains waits for want in the app container's log of pod name.
func (j *journey) waitLogContains(t *testing.T, name, want string) {
	t.Helper()
	eventually(t, fmt.Sprintf("pod %s never logged %q", name, want), func(ctx context.Context) (bool, string, error) {
		logs := podLogs(ctx, j.ns, name, "app")
		if l := strings.Split(logs, "\n"); len(l) > 20 {
			logs = strings.Join(l[len(l)-20:], "\n")
		}
		return strings.Contains(podLogs(ctx, j.ns, name, "app"), want), logs + j.sidecarLogs(ctx, name), nil
	})
}

func (j *journey) job(t *testing.T) {
	tmpl := injectedTemplate("job", "chat", "exit", "job-done")
	tmpl.Spec.RestartPolicy = corev1.RestartPolicyNever
	job := &batchv1.Job{
		ObjectMeta: metav1.ObjectMeta{Name: "once", Namespace: j.ns},
		Spec:       batchv1.JobSpec{BackoffLimit: ptr.To[int32](0), Template: tmpl},
	}
	if err := j.kube.Create(t.Context(), job); err != nil {
		t.Fatal(err)
	}
	eventually(t, "injected Job never completed", func(ctx context.Context) (bool, string, error) {
		var got batchv1.Job
		if err := j.kube.Get(ctx, ctrlclient.ObjectKeyFromObject(job), &got); err != nil {
			return false, err.Error(), client(err)
		}
		for _, c := range got.Status.Conditions {
			if c.Status == corev1.ConditionTrue && c.Type == batchv1.JobFailed {
				return false, "", fmt.Errorf("job failed: %s", c.Message)
			}
			if c.Status == corev1.ConditionTrue && c.Type == batchv1.JobComplete {
				return true, "", nil
			}
		}
		return false, fmt.Sprintf("%+v", got.Status), nil
	})
	pods, err := j.listPods(t.Context(), "job")
	if err != nil || len(pods) != 1 {
		t.Fatalf("job pods: %v, %d", err, len(pods))
	}
	checkInjected(t, &pods[0])
	if logs := podLogs(t.Context(), j.ns, pods[0].Name, "app"); !strings.Contains(logs, "job-done") {
		t.Errorf("job pod log %q, want job-done", logs)
	}
	if err := j.kube.Delete(t.Context(), job, ctrlclient.PropagationPolicy(metav1.DeletePropagationBackground)); err != nil {
		t.Fatal(err)
	}
}

func (j *journey) restricted(t *testing.T) {
	ns := newNamespace(t, map[string]string{"pod-security.kubernetes.io/enforce": "restricted"})
	createChannels(t, j.kube, ns)
	tmpl := injectedTemplate("strict", "chat", "print", "restricted-ok")
	pod := &corev1.Pod{ObjectMeta: tmpl.ObjectMeta, Spec: tmpl.Spec}
	pod.Name = "strict"
	created := createPod(t, ns, pod)
	checkInjected(t, created)
	j.waitPodRunning(t, ns, "strict")
	waitLog(t, ns, "strict", "restricted-ok")
}

func (j *journey) waitPodRunning(t *testing.T, ns, name string) {
	t.Helper()
	eventually(t, "pod "+ns+"/"+name+" never Ready", func(ctx context.Context) (bool, string, error) {
		p, err := clientset.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error(), client(err)
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return true, "", nil
			}
		}
		return false, describe(t, ns, p), nil
	})
}

func (j *journey) helmUpgrade(t *testing.T) {
	args := append([]string{"upgrade", release, "charts/podipc", "-n", releaseNS,
		"--wait", "--timeout", journeyTimeout.String()}, chartValues...)
	// A changed value rolls the controller: the new pod must serve injection too.
	args = append(args, "--set", "controller.logLevel=1")
	mustHelm(t, args...)
	j.waitControllerReady(t)
	j.waitCABundle(t)
	tmpl := injectedTemplate("after-upgrade", "chat", "print", "upgraded")
	pod := &corev1.Pod{ObjectMeta: tmpl.ObjectMeta, Spec: tmpl.Spec}
	pod.Name = "after-upgrade"
	created := createPod(t, j.ns, pod)
	checkInjected(t, created)
	j.waitPodRunning(t, j.ns, "after-upgrade")
}

func (j *journey) helmUninstall(t *testing.T) {
	mustHelm(t, "uninstall", release, "-n", releaseNS, "--wait", "--timeout", journeyTimeout.String())
	j.uninstalled = true
	ctx := t.Context()
	var left []string
	eventually(t, "podipc objects left after helm uninstall", func(ctx context.Context) (bool, string, error) {
		left = j.leftovers(ctx)
		return len(left) == 0, strings.Join(left, "\n"), nil
	})
	// The CRD and the users' Channels stay (helm never deletes CRDs; Channels are user data).
	var channels podipcv1alpha1.ChannelList
	if err := j.kube.List(ctx, &channels, ctrlclient.InNamespace(j.ns)); err != nil {
		t.Fatalf("list Channels after uninstall (the CRD must stay): %v", err)
	}
	if len(channels.Items) != 2 {
		t.Errorf("after uninstall %d Channels in %s, want the 2 the user made", len(channels.Items), j.ns)
	}
}

// leftovers lists the podipc objects that outlive the release: anything in its namespace but
// the default ServiceAccount and root CA ConfigMap, and cluster-scoped objects named podipc.
func (j *journey) leftovers(ctx context.Context) []string {
	var left []string
	lists := map[string]ctrlclient.ObjectList{
		"Pod": &corev1.PodList{}, "Service": &corev1.ServiceList{}, "Secret": &corev1.SecretList{},
		"ConfigMap": &corev1.ConfigMapList{}, "ServiceAccount": &corev1.ServiceAccountList{},
		"Deployment": &appsv1.DeploymentList{}, "Role": &rbacList{}, "RoleBinding": &rbacBindingList{},
		"Lease": &leaseList{},
	}
	for kind, l := range lists {
		if err := j.kube.List(ctx, l, ctrlclient.InNamespace(releaseNS)); err != nil {
			left = append(left, fmt.Sprintf("list %s: %v", kind, err))
			continue
		}
		for _, name := range names(l) {
			if (kind == "ServiceAccount" && name == "default") || (kind == "ConfigMap" && name == "kube-root-ca.crt") {
				continue
			}
			left = append(left, kind+" "+releaseNS+"/"+name)
		}
	}
	cluster := map[string]ctrlclient.ObjectList{
		"MutatingWebhookConfiguration": &admissionMutatingList{}, "ValidatingWebhookConfiguration": &admissionValidatingList{},
		"ClusterRole": &clusterRoleList{}, "ClusterRoleBinding": &clusterRoleBindingList{},
	}
	for kind, l := range cluster {
		if err := j.kube.List(ctx, l); err != nil {
			left = append(left, fmt.Sprintf("list %s: %v", kind, err))
			continue
		}
		for _, name := range names(l) {
			if strings.Contains(name, "podipc") {
				left = append(left, kind+" "+name)
			}
		}
	}
	slices.Sort(left)
	return left
}

func names(l ctrlclient.ObjectList) []string {
	var out []string
	items, _ := meta.ExtractList(l)
	for _, o := range items {
		if m, err := meta.Accessor(o); err == nil {
			out = append(out, m.GetName())
		}
	}
	return out
}

// Short names for the API types the journey lists.
type (
	admissionMutating       = admissionregistrationv1.MutatingWebhookConfiguration
	admissionMutatingList   = admissionregistrationv1.MutatingWebhookConfigurationList
	admissionValidatingList = admissionregistrationv1.ValidatingWebhookConfigurationList
	clusterRoleList         = rbacv1.ClusterRoleList
	clusterRoleBindingList  = rbacv1.ClusterRoleBindingList
	rbacList                = rbacv1.RoleList
	rbacBindingList         = rbacv1.RoleBindingList
	leaseList               = coordinationv1.LeaseList
)
