package channel_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	eventsv1 "k8s.io/api/events/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/internal/testenv"
	"github.com/podipc/podipc/pkg/channel"
)

// channelStatus waits until the Channel reports members/ready and Ready=True for its
// current generation.
func waitStatus(t *testing.T, ns, name string, members, ready int32) {
	t.Helper()
	testenv.Eventually(t, fmt.Sprintf("Channel %s status %d/%d", name, ready, members), func() error {
		ch := &podipcv1alpha1.Channel{}
		if err := env.Client.Get(t.Context(), client.ObjectKey{Namespace: ns, Name: name}, ch); err != nil {
			return err
		}
		c := meta.FindStatusCondition(ch.Status.Conditions, podipcv1alpha1.ConditionReady)
		if c == nil || c.Status != metav1.ConditionTrue || c.Reason != podipcv1alpha1.ReasonMembershipPublished {
			return fmt.Errorf("ready condition %+v", c)
		}
		if ch.Status.ObservedGeneration != ch.Generation || ch.Status.Members != members || ch.Status.ReadyMembers != ready {
			return fmt.Errorf("status %+v, generation %d", ch.Status, ch.Generation)
		}
		return nil
	})
}

func TestChannelWithoutMembersIsReady(t *testing.T) {
	ns := newNamespace(t)
	newChannel(t, ns, "empty")
	waitStatus(t, ns, "empty", 0, 0)
	if s := slicesOf(t, ns, "empty"); len(s) != 0 {
		t.Errorf("a channel without members has %d slices, want 0", len(s))
	}
}

// TestMembership follows three members through readiness changes, termination and
// deletion, and a pod without an IP that is not (yet) a member.
func TestMembership(t *testing.T) {
	ns := newNamespace(t)
	ch := newChannel(t, ns, "orders")
	var pods []*corev1.Pod
	for i := range 3 {
		pods = append(pods, createPod(t, sidecarPod(ns, fmt.Sprintf("member-%d", i), "", "orders,events"), fmt.Sprintf("10.1.0.%d", i+1), true))
	}
	noIP := createPod(t, sidecarPod(ns, "pending", "", "orders"), "", false)
	other := sidecarPod(ns, "other", "", "events")
	createPod(t, other, "10.1.0.9", true)
	// The API server refuses a loopback address in an EndpointSlice, and with it the whole
	// slice: such a pod is left out rather than keeping every member unpublished.
	createPod(t, sidecarPod(ns, "loopback", "", "orders"), "127.0.0.2", true)
	waitStatus(t, ns, "orders", 3, 3)

	got := slicesOf(t, ns, "orders")
	if len(got) != 1 || len(got[0].Endpoints) != 3 {
		t.Fatalf("want one slice of 3 endpoints, got %d slices: %+v", len(got), got)
	}
	es := got[0]
	if es.Labels[discoveryv1.LabelManagedBy] != "controller.podipc.dev" || es.AddressType != discoveryv1.AddressTypeIPv4 {
		t.Errorf("slice labels %v, address type %s", es.Labels, es.AddressType)
	}
	if len(es.Ports) != 1 || *es.Ports[0].Name != "podipc-peer" || *es.Ports[0].Port != 7701 || *es.Ports[0].Protocol != corev1.ProtocolTCP {
		t.Errorf("slice ports %+v, want podipc-peer 7701/TCP", es.Ports)
	}
	if !metav1.IsControlledBy(&es, ch) {
		t.Errorf("slice owners %+v, want controlled by the Channel", es.OwnerReferences)
	}
	eps, err := endpointsByPod(got)
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range pods {
		ep, ok := eps[p.Name]
		if !ok || ep.Addresses[0] != fmt.Sprintf("10.1.0.%d", i+1) || ep.TargetRef.Kind != "Pod" || ep.TargetRef.UID != p.UID ||
			!*ep.Conditions.Ready || !*ep.Conditions.Serving || *ep.Conditions.Terminating {
			t.Errorf("endpoint of %s = %+v", p.Name, ep)
		}
	}

	// Readiness flips are published.
	setPodStatus(t, pods[1], "10.1.0.2", false)
	waitStatus(t, ns, "orders", 3, 2)
	expectEndpoint(t, ns, "orders", "member-1", func(ep discoveryv1.Endpoint) bool { return !*ep.Conditions.Ready && !*ep.Conditions.Serving })
	setPodStatus(t, pods[1], "10.1.0.2", true)
	waitStatus(t, ns, "orders", 3, 3)

	// A pod that got its IP joins.
	setPodStatus(t, noIP, "10.1.0.4", true)
	waitStatus(t, ns, "orders", 4, 4)

	// A terminating pod (held by a finalizer) stays, marked terminating and not ready.
	pods[0].Finalizers = []string{"test.podipc.dev/hold"}
	if err := env.Client.Update(t.Context(), pods[0]); err != nil {
		t.Fatal(err)
	}
	if err := env.Client.Delete(t.Context(), pods[0]); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, ns, "orders", 4, 3)
	expectEndpoint(t, ns, "orders", "member-0", func(ep discoveryv1.Endpoint) bool {
		return *ep.Conditions.Terminating && !*ep.Conditions.Ready && *ep.Conditions.Serving
	})

	// Once gone, it leaves.
	if err := env.Client.Get(t.Context(), client.ObjectKeyFromObject(pods[0]), pods[0]); err != nil {
		t.Fatal(err)
	}
	pods[0].Finalizers = nil
	if err := env.Client.Update(t.Context(), pods[0]); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, ns, "orders", 3, 3)
	eps, err = endpointsByPod(slicesOf(t, ns, "orders"))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := eps["member-0"]; ok || len(eps) != 3 {
		t.Errorf("after deletion, endpoints are %v", keys(eps))
	}
	if _, ok := eps["other"]; ok {
		t.Errorf("a pod of another channel is listed")
	}
}

func expectEndpoint(t *testing.T, ns, channelName, pod string, ok func(discoveryv1.Endpoint) bool) {
	t.Helper()
	testenv.Eventually(t, "endpoint of "+pod, func() error {
		eps, err := endpointsByPod(slicesOf(t, ns, channelName))
		if err != nil {
			return err
		}
		ep, found := eps[pod]
		if !found || !ok(ep) {
			return fmt.Errorf("endpoint %+v (found %v)", ep.Conditions, found)
		}
		return nil
	})
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// TestMemberAccess: the members' service accounts, and only they, can read the channel.
func TestMemberAccess(t *testing.T) {
	ns := newNamespace(t)
	ch := newChannel(t, ns, "jobs")
	createPod(t, sidecarPod(ns, "a", "worker", "jobs"), "10.2.0.1", true)
	createPod(t, sidecarPod(ns, "b", "", "jobs"), "10.2.0.2", true)
	createPod(t, sidecarPod(ns, "c", "worker", "jobs"), "10.2.0.3", false)
	waitStatus(t, ns, "jobs", 3, 2)

	key := client.ObjectKey{Namespace: ns, Name: channel.AccessName("jobs")}
	binding := &rbacv1.RoleBinding{}
	testenv.Eventually(t, "RoleBinding subjects", func() error {
		if err := env.Client.Get(t.Context(), key, binding); err != nil {
			return err
		}
		var names []string
		for _, s := range binding.Subjects {
			if s.Kind != rbacv1.ServiceAccountKind || s.Namespace != ns {
				return fmt.Errorf("unexpected subject %+v", s)
			}
			names = append(names, s.Name)
		}
		if !slices.Equal(names, []string{"default", "worker"}) {
			return fmt.Errorf("subjects %v, want [default worker]", names)
		}
		return nil
	})
	if binding.RoleRef != (rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: channel.MemberRole}) || !metav1.IsControlledBy(binding, ch) {
		t.Errorf("binding %s: roleRef %v, owners %v; want the ClusterRole %s, owned by the Channel", binding.Name, binding.RoleRef, binding.OwnerReferences, channel.MemberRole)
	}
	if err := env.Client.Get(t.Context(), key, &rbacv1.Role{}); !apierrors.IsNotFound(err) {
		t.Errorf("the controller wrote a Role %s (or reading it failed: %v): it must only bind %s", key, err, channel.MemberRole)
	}
}

// TestChannelDeletion: the Channel owns its slices and RBAC objects (envtest runs no
// garbage collector, so the test checks the owner references that make the real one
// delete them), and the controller does not bring them back once they are gone.
func TestChannelDeletion(t *testing.T) {
	ns := newNamespace(t)
	ch := newChannel(t, ns, "brief")
	pod := createPod(t, sidecarPod(ns, "a", "", "brief"), "10.3.0.1", true)
	waitStatus(t, ns, "brief", 1, 1)

	owned := []client.Object{
		&rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: channel.AccessName("brief")}},
	}
	for _, s := range slicesOf(t, ns, "brief") {
		owned = append(owned, &s)
	}
	for _, o := range owned {
		if err := env.Client.Get(t.Context(), client.ObjectKeyFromObject(o), o); err != nil {
			t.Fatal(err)
		}
		refs := o.GetOwnerReferences()
		if len(refs) != 1 || refs[0].UID != ch.UID || refs[0].Kind != "Channel" || refs[0].APIVersion != "podipc.dev/v1alpha1" ||
			!*refs[0].Controller || !*refs[0].BlockOwnerDeletion {
			t.Errorf("%T %s owner references %+v, want the Channel as controller", o, o.GetName(), refs)
		}
	}

	if err := env.Client.Delete(t.Context(), ch); err != nil {
		t.Fatal(err)
	}
	// Do what the garbage collector would: delete what the Channel owned, and, for a
	// second, whatever of it a reconcile that read the Channel before its deletion reached
	// the controller's cache writes again (the collector deletes any object whose owner
	// is gone, whenever it appears; envtest runs no collector).
	for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		for _, o := range owned {
			if err := env.Client.Delete(t.Context(), o); err != nil && !apierrors.IsNotFound(err) {
				t.Fatal(err)
			}
		}
	}
	// A member pod changing now reconciles the channel from a cache that knows it is gone:
	// nothing may come back.
	setPodStatus(t, pod, "10.3.0.1", false)
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		for _, o := range owned {
			err := env.Client.Get(t.Context(), client.ObjectKeyFromObject(o), o)
			if !apierrors.IsNotFound(err) {
				t.Fatalf("%T %s was recreated after the Channel was deleted (err %v)", o, o.GetName(), err)
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestPodNamingMissingChannel: the pod is told by an Event, and joins once the Channel
// exists.
func TestPodNamingMissingChannel(t *testing.T) {
	ns := newNamespace(t)
	pod := createPod(t, sidecarPod(ns, "early", "", "later"), "10.4.0.1", true)
	testenv.Eventually(t, "ChannelNotFound event", func() error {
		list := &eventsv1.EventList{}
		if err := env.Client.List(t.Context(), list, client.InNamespace(ns)); err != nil {
			return err
		}
		for _, e := range list.Items {
			if e.Reason == channel.ReasonChannelNotFound && e.Regarding.UID == pod.UID && e.Type == corev1.EventTypeWarning {
				return nil
			}
		}
		return fmt.Errorf("no ChannelNotFound event for the pod among %d events", len(list.Items))
	})
	newChannel(t, ns, "later")
	waitStatus(t, ns, "later", 1, 1)
	expectEndpoint(t, ns, "later", "early", func(ep discoveryv1.Endpoint) bool { return ep.TargetRef.UID == pod.UID })
}

// TestManyMembers: 250 members fill three slices of at most 100, each pod exactly once.
func TestManyMembers(t *testing.T) {
	ns := newNamespace(t)
	newChannel(t, ns, "crowd")
	const n = 250
	createPods(t, ns, "crowd", n, 5)
	waitStatus(t, ns, "crowd", n, n)
	got := slicesOf(t, ns, "crowd")
	eps, err := endpointsByPod(got)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 || len(eps) != n {
		t.Fatalf("%d slices with %d distinct pods, want 3 slices with %d", len(got), len(eps), n)
	}
	for _, s := range got {
		if len(s.Endpoints) > 100 {
			t.Errorf("slice %s has %d endpoints", s.Name, len(s.Endpoints))
		}
	}
}

// createPods creates n ready member pods with distinct IPs in 10.<octet>.x.y, with
// a few writers in parallel.
func createPods(t testing.TB, ns, channelName string, n, octet int) []*corev1.Pod {
	t.Helper()
	pods := make([]*corev1.Pod, n)
	errs := make(chan error, n)
	sem := make(chan struct{}, 8)
	for i := range n {
		sem <- struct{}{}
		go func() {
			defer func() { <-sem }()
			p := sidecarPod(ns, fmt.Sprintf("pod-%04d", i), "", channelName)
			if err := env.Client.Create(context.Background(), p); err != nil {
				errs <- err
				return
			}
			pods[i] = p
			errs <- nil
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	setAllReady(t, pods, octet, true)
	return pods
}

// setAllReady gives every pod its IP and the readiness, with a few writers in parallel.
func setAllReady(t testing.TB, pods []*corev1.Pod, octet int, ready bool) {
	t.Helper()
	errs := make(chan error, len(pods))
	sem := make(chan struct{}, 8)
	for i, p := range pods {
		sem <- struct{}{}
		go func() {
			defer func() { <-sem }()
			st := corev1.ConditionFalse
			if ready {
				st = corev1.ConditionTrue
			}
			ip := fmt.Sprintf("10.%d.%d.%d", octet, i/250, i%250+1)
			p.Status.Phase, p.Status.PodIP, p.Status.PodIPs = corev1.PodRunning, ip, []corev1.PodIP{{IP: ip}}
			p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: st, LastTransitionTime: metav1.Now()}}
			errs <- env.Client.Status().Update(context.Background(), p)
		}()
	}
	for range pods {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}
