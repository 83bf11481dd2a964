package channel_test

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"sort"
	"testing"

	dto "github.com/prometheus/client_model/go"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/internal/testenv"
	"github.com/podipc/podipc/pkg/channel"
	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/seal"
)

// excluded reads podipc_membership_excluded_total{reason} from the controller's registry.
func excluded(t *testing.T, reason string) float64 {
	t.Helper()
	families, err := metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != "podipc_membership_excluded_total" {
			continue
		}
		for _, m := range f.GetMetric() {
			if hasLabel(m, "reason", reason) {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

func hasLabel(m *dto.Metric, name, value string) bool {
	return slices.ContainsFunc(m.GetLabel(), func(l *dto.LabelPair) bool { return l.GetName() == name && l.GetValue() == value })
}

// members returns the pod names published for a channel, sorted.
func members(t *testing.T, ns, name string) []string {
	t.Helper()
	eps, err := endpointsByPod(slicesOf(t, ns, name))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for n := range eps {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// waitMembers waits until exactly want are published.
func waitMembers(t *testing.T, ns, name string, want ...string) {
	t.Helper()
	sort.Strings(want)
	testenv.Eventually(t, fmt.Sprintf("members of %s are %v", name, want), func() error {
		if got := members(t, ns, name); !slices.Equal(got, want) {
			return fmt.Errorf("members %v", got)
		}
		return nil
	})
}

// TestForgedPodsAreNeverMembers plays the forgeries a pod creator can make without the
// webhook: a pod labelled injected with a hand-made podipc-sidecar container (no seal), one
// with a seal lifted from a pod of other channels, one whose PODIPC_CHANNELS was edited
// under a valid seal, and a hostNetwork pod with a seal that would hold. None is
// published, each is counted once with its reason, and the honest members are.
func TestForgedPodsAreNeverMembers(t *testing.T) {
	ns := newNamespace(t)
	newChannel(t, ns, "orders")
	before := map[string]float64{}
	for _, r := range []string{channel.ExcludedNoSeal, channel.ExcludedBadSeal, channel.ExcludedHostNetwork} {
		before[r] = excluded(t, r)
	}
	noSeal := sidecarPod(ns, "no-seal", "", "orders")
	delete(noSeal.Annotations, seal.Annotation)
	lifted := sidecarPod(ns, "lifted", "", "orders")
	lifted.Annotations[seal.Annotation] = sealKey.Sign(ns, "default", "events")
	edited := sidecarPod(ns, "edited", "", "events")
	edited.Spec.InitContainers[0].Env[0].Value = "events,orders"
	hostNet := sidecarPod(ns, "host-network", "", "orders")
	hostNet.Spec.HostNetwork = true
	for i, p := range []*corev1.Pod{noSeal, lifted, edited, hostNet} {
		createPod(t, p, fmt.Sprintf("10.5.0.%d", i+10), true)
	}
	createPod(t, sidecarPod(ns, "honest-1", "", "orders"), "10.5.0.1", true)
	waitMembers(t, ns, "orders", "honest-1")
	// A second honest member makes a later reconcile that sees every forged pod again.
	createPod(t, sidecarPod(ns, "honest-2", "", "orders"), "10.5.0.2", true)
	waitMembers(t, ns, "orders", "honest-1", "honest-2")
	waitStatus(t, ns, "orders", 2, 2)
	for reason, n := range map[string]float64{channel.ExcludedNoSeal: 1, channel.ExcludedBadSeal: 2, channel.ExcludedHostNetwork: 1} {
		if got := excluded(t, reason) - before[reason]; got != n {
			t.Errorf("podipc_membership_excluded_total{reason=%q} rose by %v, want %v (once per forged pod)", reason, got, n)
		}
	}
}

// TestAccess: only the service accounts of spec.access are published and granted read
// access; the others are counted in status.notPermitted; editing access moves members in
// and out within a sync; and the Access column says Restricted or Open.
func TestAccess(t *testing.T) {
	ns := newNamespace(t)
	ch := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "ledger"}}
	ch.Spec.Access = &podipcv1alpha1.Access{ServiceAccounts: []string{"bank"}}
	if err := env.Client.Create(t.Context(), ch); err != nil {
		t.Fatal(err)
	}
	newChannel(t, ns, "chat")
	createPod(t, sidecarPod(ns, "teller", "bank", "ledger,chat"), "10.6.0.1", true)
	createPod(t, sidecarPod(ns, "visitor", "guest", "ledger,chat"), "10.6.0.2", true)
	waitMembers(t, ns, "ledger", "teller")
	waitMembers(t, ns, "chat", "teller", "visitor")
	status := func(name string) podipcv1alpha1.ChannelStatus {
		got := &podipcv1alpha1.Channel{}
		if err := env.Client.Get(t.Context(), client.ObjectKey{Namespace: ns, Name: name}, got); err != nil {
			t.Fatal(err)
		}
		return got.Status
	}
	testenv.Eventually(t, "status of ledger and chat", func() error {
		l, c := status("ledger"), status("chat")
		if l.Access != podipcv1alpha1.AccessRestricted || l.NotPermitted != 1 || c.Access != podipcv1alpha1.AccessOpen || c.NotPermitted != 0 {
			return fmt.Errorf("ledger %s/%d, chat %s/%d", l.Access, l.NotPermitted, c.Access, c.NotPermitted)
		}
		return nil
	})
	if subjects := bindingSubjects(t, ns, "ledger"); !slices.Equal(subjects, []string{"bank"}) {
		t.Fatalf("ledger grants read access to %v, want only [bank]", subjects)
	}

	// Let the guest in, then take the bank out.
	edit := func(accounts ...string) {
		t.Helper()
		cur := &podipcv1alpha1.Channel{}
		if err := env.Client.Get(t.Context(), client.ObjectKeyFromObject(ch), cur); err != nil {
			t.Fatal(err)
		}
		before := cur.DeepCopy()
		cur.Spec.Access.ServiceAccounts = accounts
		// A patch, not an update: the controller writes the status meanwhile.
		if err := env.Client.Patch(t.Context(), cur, client.MergeFrom(before)); err != nil {
			t.Fatal(err)
		}
	}
	edit("bank", "guest")
	waitMembers(t, ns, "ledger", "teller", "visitor")
	edit("guest")
	waitMembers(t, ns, "ledger", "visitor")
	testenv.Eventually(t, "bank's read access is withdrawn", func() error {
		if s := bindingSubjects(t, ns, "ledger"); !slices.Equal(s, []string{"guest"}) {
			return fmt.Errorf("subjects %v", s)
		}
		return nil
	})
}

// TestAccessValidation: receiveOnly must name listed accounts, and the list is not empty.
func TestAccessValidation(t *testing.T) {
	ns := newNamespace(t)
	cases := map[string]*podipcv1alpha1.Access{
		"receive-only account not listed": {ServiceAccounts: []string{"a"}, ReceiveOnly: []string{"b"}},
		"no accounts":                     {ServiceAccounts: []string{}},
		"invalid account name":            {ServiceAccounts: []string{"Not_A_Name"}},
	}
	for name, access := range cases {
		t.Run(name, func(t *testing.T) {
			ch := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: ns, GenerateName: "v-"}}
			ch.Spec.Access = access
			if err := env.Client.Create(t.Context(), ch); err == nil {
				t.Fatalf("the API server accepted access %+v", access)
			}
		})
	}
	ok := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "fine"}}
	ok.Spec.Access = &podipcv1alpha1.Access{ServiceAccounts: []string{"a", "b"}, ReceiveOnly: []string{"b"}}
	if err := env.Client.Create(t.Context(), ok); err != nil {
		t.Fatalf("a valid access was refused: %v", err)
	}
}

// bindingSubjects returns the service accounts the channel's RoleBinding grants, sorted.
func bindingSubjects(t *testing.T, ns, name string) []string {
	t.Helper()
	b := &rbacv1.RoleBinding{}
	if err := env.Client.Get(t.Context(), client.ObjectKey{Namespace: ns, Name: channel.AccessName(name)}, b); err != nil {
		return nil
	}
	var out []string
	for _, s := range b.Subjects {
		out = append(out, s.Name)
	}
	sort.Strings(out)
	return out
}

// publishedOf returns the podipc.dev/members entries of a channel's slices, by pod name.
func publishedOf(t *testing.T, ns, name string) map[string]discovery.PublishedMember {
	t.Helper()
	out := map[string]discovery.PublishedMember{}
	for _, es := range slicesOf(t, ns, name) {
		var pm discovery.PublishedMembers
		if raw, ok := es.Annotations[podipcv1alpha1.MembersAnnotation]; ok {
			if err := json.Unmarshal([]byte(raw), &pm); err != nil {
				t.Fatalf("slice %s: annotation %q: %v", es.Name, raw, err)
			}
		}
		for _, ep := range es.Endpoints {
			if e, ok := pm[string(ep.TargetRef.UID)]; ok {
				out[ep.TargetRef.Name] = e
			}
		}
	}
	return out
}

// TestPublishedAccess: the controller publishes, next to each endpoint, the pod's service
// account and whether spec.access makes it receive-only; an edit of receiveOnly rewrites
// what is published at the next sync, and an open channel publishes every member free to
// send.
func TestPublishedAccess(t *testing.T) {
	ns := newNamespace(t)
	ch := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "feed"}}
	ch.Spec.Access = &podipcv1alpha1.Access{ServiceAccounts: []string{"writer", "reader"}, ReceiveOnly: []string{"reader"}}
	if err := env.Client.Create(t.Context(), ch); err != nil {
		t.Fatal(err)
	}
	newChannel(t, ns, "open")
	createPod(t, sidecarPod(ns, "w", "writer", "feed,open"), "10.6.1.1", true)
	createPod(t, sidecarPod(ns, "r", "reader", "feed,open"), "10.6.1.2", true)
	wait := func(channel string, want map[string]discovery.PublishedMember) {
		t.Helper()
		testenv.Eventually(t, "published members of "+channel, func() error {
			if got := publishedOf(t, ns, channel); !maps.Equal(got, want) {
				return fmt.Errorf("published %v, want %v", got, want)
			}
			return nil
		})
	}
	wait("feed", map[string]discovery.PublishedMember{"w": {ServiceAccount: "writer"}, "r": {ServiceAccount: "reader", ReceiveOnly: true}})
	wait("open", map[string]discovery.PublishedMember{"w": {ServiceAccount: "writer"}, "r": {ServiceAccount: "reader"}})

	cur := &podipcv1alpha1.Channel{}
	if err := env.Client.Get(t.Context(), client.ObjectKeyFromObject(ch), cur); err != nil {
		t.Fatal(err)
	}
	before := cur.DeepCopy()
	cur.Spec.Access.ReceiveOnly = []string{"writer"}
	if err := env.Client.Patch(t.Context(), cur, client.MergeFrom(before)); err != nil {
		t.Fatal(err)
	}
	wait("feed", map[string]discovery.PublishedMember{"w": {ServiceAccount: "writer", ReceiveOnly: true}, "r": {ServiceAccount: "reader"}})
}
