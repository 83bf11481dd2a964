package cli

import (
	"context"
	"net"
	"strconv"
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
)

func TestPickMember(t *testing.T) {
	ms := []member{
		{Pod: "pod-0", Ready: false},
		{Pod: "pod-1", Ready: true},
		{Pod: "pod-2", Ready: true, Terminating: true},
		{Pod: "pod-3", Ready: true},
	}
	tests := map[string]struct {
		ms             []member
		current, avoid string
		want           string
		ok             bool
	}{
		"first ready by name":               {ms, "", "", "pod-1", true},
		"stays on the current member":       {ms, "pod-3", "", "pod-3", true},
		"leaves a lost member":              {ms, "pod-1", "pod-1", "pod-3", true},
		"leaves a member gone unready":      {ms, "pod-0", "", "pod-1", true},
		"leaves a terminating member":       {ms, "pod-2", "", "pod-1", true},
		"the lost member if the only one":   {[]member{{Pod: "pod-1", Ready: true}}, "pod-1", "pod-1", "pod-1", true},
		"none ready":                        {[]member{{Pod: "pod-0"}, {Pod: "pod-2", Ready: true, Terminating: true}}, "", "", "", false},
		"no members":                        {nil, "", "", "", false},
		"an endpoint without a pod skipped": {[]member{{Pod: "<unknown>", Ready: true}}, "", "", "", false},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, ok := pickMember(tc.ms, tc.current, tc.avoid)
			if got != tc.want || ok != tc.ok {
				t.Fatalf("pickMember = %q, %v; want %q, %v", got, ok, tc.want, tc.ok)
			}
		})
	}
}

// TestTailReattaches plays two member pods by two line servers behind a port-forward
// stand-in, with the members published in EndpointSlices of a real API server: tail
// attaches to the first ready member; when that pod's connection ends and the pod turns
// terminating, tail attaches to the other, says so on standard error, and prints the
// lines of both in order.
func TestTailReattaches(t *testing.T) {
	ctx := t.Context()
	const ns = "reattach"
	createNamespace(t, ns)
	if err := env.Client.Create(ctx, &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "orders"}}); err != nil {
		t.Fatal(err)
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: "orders-a", Labels: map[string]string{channelLabel: "orders"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{endpoint(ns, "pod-a", "10.0.0.1", false), endpoint(ns, "pod-b", "10.0.0.2", false)},
	}
	if err := env.Client.Create(ctx, slice); err != nil {
		t.Fatal(err)
	}

	gone := make(chan struct{})
	podA := startLineServer(t, func(c net.Conn) {
		_, _ = c.Write([]byte("from a 1\nfrom a 2\n"))
		<-gone // the pod is deleted: its connection ends
	})
	podB := startLineServer(t, func(c net.Conn) {
		_, _ = c.Write([]byte("from b 1\n"))
		_, _ = c.Read(make([]byte, 1))
	})
	addrs := map[string]string{"pod-a": "127.0.0.1:" + strconv.Itoa(podA.port()), "pod-b": "127.0.0.1:" + strconv.Itoa(podB.port())}
	cs, err := kubernetes.NewForConfig(env.Config)
	if err != nil {
		t.Fatal(err)
	}
	var dialled []string
	tg := &memberTarget{cs: cs, ns: ns, channel: "orders", port: 7000,
		fw: func(ctx context.Context, gotNS, pod string, port int) (conn, error) {
			if gotNS != ns || port != 7000 {
				t.Errorf("forwarded to %s/%s:%d, want namespace %s port 7000", gotNS, pod, port, ns)
			}
			dialled = append(dialled, pod)
			c, _, err := (&localTarget{addr: addrs[pod]}).dial(ctx, false)
			return c, err
		}}

	var out, errb syncBuffer
	tctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		tl := tailer{target: tg, out: &out, log: &errb, reconnect: true, backoff: backoff{min: 50 * time.Millisecond, max: time.Second}}
		done <- tl.run(tctx)
	}()
	waitFor(t, func() bool { return strings.Count(out.String(), "\n") == 2 }, "the lines of pod-a")
	// Delete pod-a: it turns terminating in its EndpointSlice, and its connection ends.
	slice.Endpoints[0] = endpoint(ns, "pod-a", "10.0.0.1", true)
	if err := env.Client.Update(ctx, slice); err != nil {
		t.Fatal(err)
	}
	close(gone)
	waitFor(t, func() bool { return strings.Count(out.String(), "\n") == 3 }, "the line of pod-b")
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("tail: %v", err)
	}
	if got := out.String(); got != "from a 1\nfrom a 2\nfrom b 1\n" {
		t.Fatalf("tail printed %q", got)
	}
	log := errb.String()
	for _, want := range []string{"attached to pod reattach/pod-a", "connection to pod reattach/pod-a lost", "reattached to pod reattach/pod-b (was pod reattach/pod-a)"} {
		if !strings.Contains(log, want) {
			t.Errorf("stderr lacks %q:\n%s", want, log)
		}
	}
	if strings.Join(dialled, ",") != "pod-a,pod-b" {
		t.Errorf("dialled %v, want pod-a then pod-b", dialled)
	}
}

// TestTailNoReadyMember: with no ready member, tail from outside says so, like kubectl
// does for a Service without endpoints, and names the command that lists them.
func TestTailNoReadyMember(t *testing.T) {
	createNamespace(t, "noready")
	ctx := t.Context()
	if err := env.Client.Create(ctx, &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: "noready", Name: "orders"}}); err != nil {
		t.Fatal(err)
	}
	code, _, stderr := run(ctx, "", "tail", "orders", "-n", "noready", "--kubeconfig", kubeconfig, "--no-reconnect")
	if code == 0 || !strings.Contains(stderr, "no ready member pod of channel orders in namespace noready (podipc members orders -n noready lists them)") {
		t.Fatalf("exit %d, stderr %q", code, stderr)
	}
	code, _, stderr = run(ctx, "", "send", "typo", "-n", "noready", "--kubeconfig", kubeconfig, "x")
	if code == 0 || !strings.Contains(stderr, "reading Channel noready/typo") {
		t.Fatalf("unknown channel: exit %d, stderr %q", code, stderr)
	}
}

func endpoint(ns, pod, ip string, terminating bool) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{
		Addresses: []string{ip},
		TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: pod, UID: types.UID("uid-" + pod)},
		Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(!terminating), Serving: ptr.To(true),
			Terminating: ptr.To(terminating)},
	}
}

// TestForwardToMissingPod runs the real port-forward dialer against the real API server:
// a pod that does not exist is a clear error naming it, for send and for tail with
// --no-reconnect, not a hang.
func TestForwardToMissingPod(t *testing.T) {
	ctx := t.Context()
	createNamespace(t, "forward")
	ch := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: "forward", Name: "orders"}}
	if err := env.Client.Create(ctx, ch); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"send", "orders", "--pod", "gone", "x"},
		{"tail", "orders", "--pod", "gone", "--no-reconnect"},
	} {
		code, _, stderr := run(ctx, "", append(args, "-n", "forward", "--kubeconfig", kubeconfig)...)
		if code == 0 || !strings.Contains(stderr, `port-forwarding to pod forward/gone: unable to upgrade connection: pods "gone" not found`) {
			t.Errorf("%v: exit %d, stderr %q", args, code, stderr)
		}
	}
}
