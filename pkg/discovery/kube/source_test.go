package kube_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/testr"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/rand"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/retry"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/internal/testenv"
	"github.com/podipc/podipc/pkg/channel"
	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/discovery/kube"
)

var env *testenv.Env

// TestMain runs in a private network namespace where testenv.PodCIDR is local, so that
// real sidecars can run on pod IPs the API server accepts in EndpointSlices.
func TestMain(m *testing.M) {
	testenv.EnterPodNetwork()
	testenv.Main(m, &env, startController)
}

// startController installs the member ClusterRole (as the chart does) and runs the real
// controller, which publishes the EndpointSlices and binds the members that role, the
// access the source relies on.
func startController(e *testenv.Env) (func(), error) {
	ctrl.SetLogger(logr.Discard()) // the tests assert outcomes; controller logs are noise here
	member := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: channel.MemberRole}, Rules: channel.MemberRules()}
	if err := e.Client.Create(context.Background(), member); err != nil {
		return nil, err
	}
	return e.StartManager(ctrl.Options{
		Cache: cache.Options{ByObject: channel.CacheByObject()},
	}, func(ctx context.Context, mgr ctrl.Manager) error {
		r := &channel.Reconciler{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorder("podipc-controller")}
		return r.SetupWithManager(ctx, mgr, 2)
	})
}

// states records the snapshots a Source delivers.
type states struct {
	mu  sync.Mutex
	all []discovery.State
}

func (s *states) update(st discovery.State) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.all = append(s.all, st)
}

func (s *states) snapshot() []discovery.State {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.all)
}

// waitFor waits until the latest snapshot satisfies ok.
func (s *states) waitFor(t *testing.T, what string, ok func(discovery.State) error) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		all := s.snapshot()
		err := fmt.Errorf("no snapshot yet")
		if len(all) > 0 {
			err = ok(all[len(all)-1])
		}
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func memberNames(st discovery.State, ch string) []string {
	var names []string
	for _, m := range st.Channels[ch].Members {
		names = append(names, m.Name)
	}
	return names
}

func hasMembers(ch string, want ...string) func(discovery.State) error {
	return func(st discovery.State) error {
		if _, ok := st.Channels[ch]; !ok {
			return fmt.Errorf("channel %s absent from %v", ch, st)
		}
		if got := memberNames(st, ch); !slices.Equal(got, want) {
			return fmt.Errorf("members of %s = %v, want %v", ch, got, want)
		}
		return nil
	}
}

func sidecarPod(ns, name, channels, ip string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{podipcv1alpha1.InjectedLabel: "true"}},
		Spec: corev1.PodSpec{
			InitContainers: []corev1.Container{{
				Name: podipcv1alpha1.SidecarContainerName, Image: "sidecar", RestartPolicy: ptrTo(corev1.ContainerRestartPolicyAlways),
				Env: []corev1.EnvVar{{Name: podipcv1alpha1.ChannelsEnv, Value: channels}},
			}},
			Containers: []corev1.Container{{Name: "app", Image: "app"}},
		},
		Status: corev1.PodStatus{
			Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
		},
	}
}

func ptrTo[T any](v T) *T { return &v }

// addPod creates a member pod with its IP and readiness (no kubelet sets them here).
func addPod(t testing.TB, p *corev1.Pod) *corev1.Pod {
	t.Helper()
	status := p.Status
	if err := env.Client.Create(context.Background(), p); err != nil {
		t.Fatal(err)
	}
	p.Status = status
	if err := env.Client.Status().Update(context.Background(), p); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestSourceFollowsTheChannel runs the source as the pods' service account, through
// members joining and leaving, a Channel edit, a channel created after the pod, and an
// API server restart.
func TestSourceFollowsTheChannel(t *testing.T) {
	noLeaks(t)
	ns := "t-" + rand.String(8)
	if err := env.Client.Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
		t.Fatal(err)
	}
	feed := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "feed"}, Spec: podipcv1alpha1.ChannelSpec{LocalPort: 7300}}
	if err := env.Client.Create(t.Context(), feed); err != nil {
		t.Fatal(err)
	}
	self := addPod(t, sidecarPod(ns, "a-self", "feed,later", "10.9.0.1"))
	addPod(t, sidecarPod(ns, "b-peer", "feed", "10.9.0.2"))

	// The sidecar's identity: its service account, with only what the controller grants.
	cfg := rest.CopyConfig(env.Config)
	cfg.Impersonate = rest.ImpersonationConfig{UserName: "system:serviceaccount:" + ns + ":default"}
	src := &kube.Source{Config: cfg, Namespace: ns, Channels: []string{"feed", "later"}, Log: testr.New(t)}
	got := &states{}
	ctx, cancel := context.WithCancel(t.Context())
	runErr := make(chan error, 1)
	go func() { runErr <- src.Run(ctx, got.update) }()
	t.Cleanup(func() {
		cancel()
		if err := <-runErr; err != nil {
			t.Errorf("Run returned %v after cancel, want nil", err)
		}
	})

	got.waitFor(t, "both members, self included", hasMembers("feed", "a-self", "b-peer"))
	st := got.snapshot()[len(got.snapshot())-1]
	if _, ok := st.Channels["later"]; ok {
		t.Errorf("channel later does not exist but is in the state")
	}
	want := discovery.Spec{LocalPort: 7300}.WithDefaults()
	if st.Channels["feed"].Spec != want {
		t.Errorf("spec = %+v, want %+v", st.Channels["feed"].Spec, want)
	}
	for _, m := range st.Channels["feed"].Members {
		if m.Name == "a-self" && (m.UID != string(self.UID) || m.IP != "10.9.0.1" || m.PeerPort != 7701 || !m.Ready || m.Namespace != ns) {
			t.Errorf("self member = %+v", m)
		}
	}

	// Members join and leave.
	c := addPod(t, sidecarPod(ns, "c-peer", "feed", "10.9.0.3"))
	got.waitFor(t, "c-peer joins", hasMembers("feed", "a-self", "b-peer", "c-peer"))
	if err := env.Client.Delete(t.Context(), c); err != nil {
		t.Fatal(err)
	}
	got.waitFor(t, "c-peer leaves", hasMembers("feed", "a-self", "b-peer"))

	// A Channel edit is applied live. The controller running beside the test writes the
	// Channel's status, so an edit may meet a conflict: read again and retry, as kubectl
	// edit would.
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		if err := env.Client.Get(t.Context(), client.ObjectKeyFromObject(feed), feed); err != nil {
			return err
		}
		feed.Spec.Delivery = podipcv1alpha1.DeliveryAnyOne
		feed.Spec.Overflow.MaxWait = &metav1.Duration{Duration: 2 * time.Second}
		feed.Spec.Overflow.MaxBlock = &metav1.Duration{Duration: 5 * time.Second}
		return env.Client.Update(t.Context(), feed)
	}); err != nil {
		t.Fatal(err)
	}
	got.waitFor(t, "edited spec", func(st discovery.State) error {
		if s := st.Channels["feed"].Spec; s.Delivery != discovery.AnyOne || s.Overflow.MaxWait != 2*time.Second ||
			s.Overflow.MaxBlock != 5*time.Second {
			return fmt.Errorf("spec %+v", s)
		}
		return nil
	})

	// The API server goes away and comes back (same etcd): the source keeps what it knew,
	// then catches up with a change made after the restart.
	before := len(got.snapshot())
	if err := env.RestartAPIServer(func() { time.Sleep(3 * time.Second) }); err != nil {
		t.Fatal(err)
	}
	for _, st := range got.snapshot()[before:] {
		if err := hasMembers("feed", "a-self", "b-peer")(st); err != nil {
			t.Errorf("during the outage the source delivered %v: %v", st, err)
		}
	}
	addPod(t, sidecarPod(ns, "d-peer", "feed", "10.9.0.4"))
	got.waitFor(t, "d-peer joins after the restart", hasMembers("feed", "a-self", "b-peer", "d-peer"))

	// A channel the pod named before it existed is served once it is created (its Role
	// and binding only appear then).
	later := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "later"}}
	if err := env.Client.Create(t.Context(), later); err != nil {
		t.Fatal(err)
	}
	got.waitFor(t, "channel later appears", hasMembers("later", "a-self"))

	// A deleted Channel is no longer served.
	if err := env.Client.Delete(t.Context(), later); err != nil {
		t.Fatal(err)
	}
	got.waitFor(t, "channel later removed", func(st discovery.State) error {
		if _, ok := st.Channels["later"]; ok {
			return fmt.Errorf("still there")
		}
		return nil
	})
}
