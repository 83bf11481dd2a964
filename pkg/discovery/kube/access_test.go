package kube_test

import (
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/rand"
	"sigs.k8s.io/controller-runtime/pkg/client"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/internal/testenv"
)

// TestAccessInKubernetesMode: real sidecar processes against the real API server and the
// controller. On a channel whose spec.access makes the account "reader" receive-only, the
// reader's pod receives every line and the others drop its lines; an edit of spec.access
// that removes "reader" takes the pod out of the membership, and its peers close its links
// at the next snapshot: it receives nothing more.
func TestAccessInKubernetesMode(t *testing.T) {
	noLeaks(t)
	bin := buildSidecar(t)
	ns := "t-" + rand.String(8)
	if err := env.Client.Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
		t.Fatal(err)
	}
	ch := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "talk"},
		Spec: podipcv1alpha1.ChannelSpec{LocalPort: talkPort, Delivery: podipcv1alpha1.DeliveryBroadcast,
			Access: &podipcv1alpha1.Access{ServiceAccounts: []string{"default", "reader"}, ReceiveOnly: []string{"reader"}}}}
	if err := env.Client.Create(t.Context(), ch); err != nil {
		t.Fatal(err)
	}
	run := func(name, sa, ip string) *app {
		p := sidecarPod(ns, name, "talk", ip)
		p.Spec.ServiceAccountName = sa
		p = addPod(t, p)
		sc := startSidecar(t, bin, writeKubeconfig(t, "system:serviceaccount:"+ns+":"+sa), p, ip)
		waitReady(t, sc)
		return dialApp(t, name, ip)
	}
	a := run("pod-a", "default", podIP(21))
	b := run("pod-b", "default", podIP(22))
	r := run("pod-r", "reader", podIP(23))
	meshUp(t, []*app{a, b})
	// The reader receives from both (links from a and b to r are up)...
	for _, from := range []*app{a, b} {
		testenv.Eventually(t, "a line from "+from.name+" reaching pod-r", func() error {
			line := "to the reader " + rand.String(6)
			from.send(t, line)
			if !r.receives(line, 300*time.Millisecond) {
				return fmt.Errorf("%q did not arrive", line)
			}
			return nil
		})
	}
	// ...but what it sends reaches no one, while a's lines still reach b.
	r.send(t, "from the reader")
	a.send(t, "from a")
	b.expect(t, "from a")
	for _, to := range []*app{a, b} {
		if to.receives("from the reader", time.Second) {
			t.Fatalf("%s received a line of the receive-only member", to.name)
		}
	}

	// The edit that removes the reader's account: within one sync its peers close its
	// links, and it receives nothing more.
	if err := env.Client.Get(t.Context(), client.ObjectKeyFromObject(ch), ch); err != nil {
		t.Fatal(err)
	}
	before := ch.DeepCopy()
	ch.Spec.Access = &podipcv1alpha1.Access{ServiceAccounts: []string{"default"}}
	// A patch, not an update: the controller writes the status meanwhile.
	if err := env.Client.Patch(t.Context(), ch, client.MergeFrom(before)); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "pod-r no longer receives", func() error {
		line := "after the edit " + rand.String(4)
		a.send(t, line)
		b.expect(t, line)
		if r.receives(line, 500*time.Millisecond) {
			return fmt.Errorf("pod-r still received %q", line)
		}
		return nil
	})
	b.send(t, "reader removed")
	a.expect(t, "reader removed")
	if r.receives("reader removed", time.Second) {
		t.Fatal("pod-r received a line after its account was removed")
	}
}
