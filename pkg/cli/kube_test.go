package cli

import (
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/internal/testenv"
)

var (
	env        *testenv.Env
	kubeconfig string
)

func TestMain(m *testing.M) { testenv.Main(m, &env, writeKubeconfig) }

// writeKubeconfig gives the commands under test a kubeconfig of their own, for a cluster
// admin, as a user's would be.
func writeKubeconfig(e *testenv.Env) (func(), error) {
	var err error
	kubeconfig, err = e.WriteKubeconfig(e.Dir, "cli-test")
	return nil, err
}

func createNamespace(t *testing.T, name string) {
	t.Helper()
	if err := env.Client.Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}); err != nil {
		t.Fatal(err)
	}
}

func TestMembers(t *testing.T) {
	ctx := t.Context()
	createNamespace(t, "members")
	if err := env.Client.Create(ctx, &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: "members", Name: "orders"}}); err != nil {
		t.Fatal(err)
	}
	if err := env.Client.Create(ctx, &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: "members", Name: "empty"}}); err != nil {
		t.Fatal(err)
	}
	ep := func(pod, ip string, ready, terminating bool) discoveryv1.Endpoint {
		return discoveryv1.Endpoint{
			Addresses:  []string{ip},
			NodeName:   ptr.To("node-1"),
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: "members", Name: pod, UID: types.UID("uid-" + pod)},
			Conditions: discoveryv1.EndpointConditions{Ready: &ready, Serving: &ready, Terminating: &terminating},
		}
	}
	slice := func(name, channel string, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
		return &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Namespace: "members", Name: name, Labels: map[string]string{
				channelLabel: channel, discoveryv1.LabelManagedBy: "controller.podipc.dev"}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("podipc-peer"), Port: ptr.To[int32](7701)}},
			Endpoints:   eps,
		}
	}
	// Two slices for orders (members are listed across slices, sorted), one for another channel.
	for _, s := range []*discoveryv1.EndpointSlice{
		slice("orders-a", "orders", ep("web-2", "10.0.0.12", true, false), ep("web-0", "10.0.0.10", true, false)),
		slice("orders-b", "orders", ep("web-1", "10.0.0.11", false, true)),
		slice("events-a", "events", ep("other", "10.0.0.99", true, false)),
	} {
		if err := env.Client.Create(ctx, s); err != nil {
			t.Fatal(err)
		}
	}

	code, stdout, stderr := run(ctx, "", "members", "orders", "-n", "members", "--kubeconfig", kubeconfig)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	want := [][]string{
		{"POD", "IP", "NODE", "READY", "TERMINATING"},
		{"web-0", "10.0.0.10", "node-1", "true", "false"},
		{"web-1", "10.0.0.11", "node-1", "false", "true"},
		{"web-2", "10.0.0.12", "node-1", "true", "false"},
	}
	if len(lines) != len(want) {
		t.Fatalf("members printed:\n%s", stdout)
	}
	for i, w := range want {
		if got := strings.Fields(lines[i]); strings.Join(got, " ") != strings.Join(w, " ") {
			t.Errorf("row %d = %q, want %q", i, got, w)
		}
	}

	code, stdout, stderr = run(ctx, "", "members", "empty", "-n", "members", "--kubeconfig", kubeconfig)
	if code != 0 || stdout != "" || !strings.Contains(stderr, "No members of channel empty") {
		t.Errorf("empty channel: exit %d stdout %q stderr %q", code, stdout, stderr)
	}
	code, _, stderr = run(ctx, "", "members", "typo", "-n", "members", "--kubeconfig", kubeconfig)
	if code == 0 || !strings.Contains(stderr, "channel typo not found in namespace members") {
		t.Errorf("missing channel: exit %d stderr %q", code, stderr)
	}
}

// TestSendResolvesChannel: `podipc send orders --address 127.0.0.1` (a sidecar on this
// machine) finds the port in Channel.spec.localPort.
func TestSendResolvesChannel(t *testing.T) {
	ctx := t.Context()
	createNamespace(t, "send")
	srv := startLineServer(t, nil)
	ch := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: "send", Name: "orders"}}
	ch.Spec.LocalPort = int32(srv.port())
	if err := env.Client.Create(ctx, ch); err != nil {
		t.Fatalf("creating a Channel on port %d: %v", srv.port(), err)
	}
	code, _, stderr := run(ctx, "", "send", "orders", "-n", "send", "--kubeconfig", kubeconfig, "--address", "127.0.0.1", "via the channel")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if got := srv.received(t, 1); len(got) != 1 || len(got[0]) != 1 || got[0][0] != "via the channel" {
		t.Fatalf("server received %q", got)
	}
	code, _, stderr = run(ctx, "", "send", "nope", "-n", "send", "--kubeconfig", kubeconfig, "--address", "127.0.0.1", "x")
	if code == 0 || !strings.Contains(stderr, "reading Channel send/nope") {
		t.Errorf("unknown channel: exit %d stderr %q", code, stderr)
	}
}

// TestCheckInjectionWithoutWebhook: with no injector the API server admits the probe pod
// as is, and check-injection must say so and fail (this API server runs no webhook).
func TestCheckInjectionWithoutWebhook(t *testing.T) {
	createNamespace(t, "check")
	start := time.Now()
	code, stdout, stderr := run(t.Context(), "", "check-injection", "-n", "check", "--kubeconfig", kubeconfig, "--timeout", "3s")
	if code == 0 || !strings.Contains(stderr, "admitted without the podipc-sidecar init container") {
		t.Fatalf("exit %d stdout %q stderr %q", code, stdout, stderr)
	}
	if time.Since(start) < 2*time.Second {
		t.Errorf("check-injection gave up after %s, before its --timeout", time.Since(start))
	}
	// The dry run stored nothing.
	cs, err := kubernetes.NewForConfig(env.Config)
	if err != nil {
		t.Fatal(err)
	}
	pods, err := cs.CoreV1().Pods("check").List(t.Context(), metav1.ListOptions{})
	if err != nil || len(pods.Items) != 0 {
		t.Errorf("check-injection left %d pods (%v)", len(pods.Items), err)
	}
}

func TestInjected(t *testing.T) {
	sidecar := corev1.Container{Name: sidecarName, RestartPolicy: ptr.To(corev1.ContainerRestartPolicyAlways)}
	tests := map[string]struct {
		pod  corev1.Pod
		want string
	}{
		"injected": {corev1.Pod{ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{injectedLabel: "true"}},
			Spec: corev1.PodSpec{InitContainers: []corev1.Container{sidecar}}}, ""},
		"no sidecar": {corev1.Pod{}, "admitted without"},
		"not native": {corev1.Pod{ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{injectedLabel: "true"}},
			Spec: corev1.PodSpec{InitContainers: []corev1.Container{{Name: sidecarName}}}}, "not a native sidecar"},
		"no label": {corev1.Pod{Spec: corev1.PodSpec{InitContainers: []corev1.Container{sidecar}}}, "not the label"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			err := injected(&tc.pod)
			if (tc.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.want)) {
				t.Fatalf("injected = %v, want %q", err, tc.want)
			}
		})
	}
}
