//go:build e2efaults

package faults

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/utils/ptr"
	ctrlclient "sigs.k8s.io/controller-runtime/pkg/client"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
)

const (
	release   = "podipc"
	releaseNS = "podipc-system"
	// rate is how many lines a second every streaming app sends on its channel.
	rate = 10
	// Replicas of the two Deployments.
	bcastReplicas = 4
	anyReplicas   = 3
	// settleTimeout bounds every wait for traffic or membership to come back; waits are
	// never timing assertions, except membershipBound, the bound docs/reliability.md states.
	settleTimeout   = 3 * time.Minute
	membershipBound = 60 * time.Second
)

// faultCase is one fault: inject makes it and returns when it is over (restoring it is
// deferred inside, and run restores everything again whatever happened).
type faultCase struct {
	name   string
	kind   kind
	kills  int // sidecarKill: how many times each victim's sidecar is killed
	inject func(t *testing.T, s *suite, victims []*corev1.Pod)
	// own, if set, is a fault with workloads and accounting of its own (the memory squeeze):
	// it runs instead of inject and the streams' accounting.
	own func(t *testing.T, s *suite) []result
}

func linkDownFor(d time.Duration) func(*testing.T, *suite, []*corev1.Pod) {
	return func(t *testing.T, s *suite, victims []*corev1.Pod) {
		defer s.restore(t)
		for _, v := range victims {
			mustFault(t, "link", v.Status.PodIP, "down")
		}
		time.Sleep(d)
		for _, v := range victims {
			mustFault(t, "link", v.Status.PodIP, "up")
		}
	}
}

// faultsFor makes each fault (fault.sh arguments after the pod IP) on every victim for d.
func faultsFor(d time.Duration, faults ...[]string) func(*testing.T, *suite, []*corev1.Pod) {
	return func(t *testing.T, s *suite, victims []*corev1.Pod) {
		defer s.restore(t)
		for _, v := range victims {
			for _, f := range faults {
				mustFault(t, append([]string{f[0], v.Status.PodIP}, f[1:]...)...)
			}
		}
		time.Sleep(d)
	}
}

var (
	loss    = []string{"impair", "loss=10"}
	dup     = []string{"impair", "dup=5"}
	delay   = []string{"delay", "50ms", "20ms"}
	reorder = []string{"delay", "10ms", "0ms", "10"}
	all     = [][]string{{"impair", "loss=10", "dup=5"}, {"delay", "50ms", "20ms", "10"}}
)

var faultCases = []faultCase{
	{name: "loss 10%", kind: network, inject: faultsFor(15*time.Second, loss)},
	{name: "delay 50 ms ± 20 ms", kind: network, inject: faultsFor(15*time.Second, delay)},
	{name: "duplication 5%", kind: network, inject: faultsFor(15*time.Second, dup)},
	{name: "reordering 10%", kind: network, inject: faultsFor(15*time.Second, reorder)},
	{name: "all at once", kind: network, inject: faultsFor(15*time.Second, all...)},
	{name: "veth down 5 s", kind: network, inject: linkDownFor(5 * time.Second)},
	{name: "veth down 30 s", kind: network, inject: linkDownFor(30 * time.Second)},
	{name: "sidecar SIGKILL ×3", kind: sidecarKill, kills: 3, inject: killSidecars(3)},
	{name: "pod deleted (graceful)", kind: podDelete, inject: deletePods(nil)},
	{name: "pod force-deleted (grace 0)", kind: podForceDelete, inject: deletePods(ptr.To[int64](0))},
	{name: "memory squeeze", own: memorySqueeze},
	// The controller exits when it loses its leader lease (the API server gone for 60 s) and,
	// restarted, waits for the API server (cmd/podipc-controller): the API server comes last
	// all the same, so that its restart does not overlap the other faults.
	{name: "controller SIGKILL", kind: controlPlane, inject: killController},
	{name: "etcd restarted", kind: controlPlane, inject: stopDaemon("etcd", 0)},
	{name: "kube-apiserver stopped 60 s", kind: controlPlane, inject: stopDaemon("kube-apiserver", 60*time.Second)},
}

// TestFaults streams numbered lines on a Broadcast and an AnyOne channel, makes each fault in
// turn on one pod of each Deployment (the victims), and counts the lines of each fault.
func TestFaults(t *testing.T) {
	s := &suite{ns: newNamespace(t)}
	t.Cleanup(func() {
		if err := fault("restore"); err != nil {
			t.Errorf("restore: %v", err)
		}
	})
	s.install(t)
	var results []result
	for _, fc := range faultCases {
		ok := t.Run(strings.NewReplacer(" ", "_", "%", "pct", "×", "x").Replace(fc.name), func(t *testing.T) {
			if fc.own != nil {
				results = append(results, fc.own(t, s)...)
				return
			}
			results = append(results, s.run(t, fc)...)
		})
		if !ok && len(results) == 0 {
			break // the streams never settled: nothing to report
		}
	}
	if len(results) > 0 {
		if err := writeReport(results); err != nil {
			t.Error(err)
		}
	}
}

// suite is the state the faults share.
type suite struct {
	ns string
	// final holds, per deleted victim, the drop totals its sidecar logged as it exited
	// (the "Drained" line, exit_test.go): what it counted after the last poll.
	mu    sync.Mutex
	final map[string]map[string]float64
	// exitLogs holds what a deleted victim's sidecar logged from its deletion on.
	exitLogs map[string][]string
}

func newNamespace(t *testing.T) string {
	t.Helper()
	ns, err := clientset.CoreV1().Namespaces().Create(t.Context(), &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "faults-"},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = clientset.CoreV1().Namespaces().Delete(ctx, ns.Name, metav1.DeleteOptions{})
	})
	waitFor(t, "default ServiceAccount", func(ctx context.Context) (bool, string) {
		_, err := clientset.CoreV1().ServiceAccounts(ns.Name).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, fmt.Sprint(err)
	})
	return ns.Name
}

// waitFor polls cond every second until it holds, failing with its last state.
func waitFor(t *testing.T, what string, cond func(ctx context.Context) (bool, string)) time.Duration {
	t.Helper()
	start := time.Now()
	var last string
	err := wait.PollUntilContextTimeout(t.Context(), time.Second, settleTimeout, true, func(ctx context.Context) (bool, error) {
		ok, state := cond(ctx)
		last = state
		return ok, nil
	})
	if err != nil {
		t.Fatalf("%s: %v\nlast state: %s", what, err, last)
	}
	return time.Since(start)
}

// install puts the chart, the two Channels and the two streaming Deployments in place.
func (s *suite) install(t *testing.T) {
	args := []string{"install", release, "charts/podipc", "-n", releaseNS, "--create-namespace", "--wait",
		"--timeout", "4m", "--set", "image.repository=" + podipcRepository, "--set", "image.tag=" + podipcVersion,
		"--set", "image.pullPolicy=Never", "--set", "webhook.certMode=self", "--set", "controller.replicas=1"}
	if out, err := helm(t.Context(), args...); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("helm install:\n%s", out)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		_, _ = helm(ctx, "uninstall", release, "-n", releaseNS, "--wait", "--timeout", "3m")
	})
	waitFor(t, "webhook caBundle", func(ctx context.Context) (bool, string) {
		var m admissionregistrationv1.MutatingWebhookConfiguration
		if err := kube.Get(ctx, ctrlclient.ObjectKey{Name: "podipc-injector"}, &m); err != nil {
			return false, err.Error()
		}
		return len(m.Webhooks) > 0 && len(m.Webhooks[0].ClientConfig.CABundle) > 0, "no caBundle"
	})
	for _, ch := range []*podipcv1alpha1.Channel{
		{
			ObjectMeta: metav1.ObjectMeta{Name: bcast, Namespace: s.ns},
			Spec:       podipcv1alpha1.ChannelSpec{LocalPort: 7000, Delivery: podipcv1alpha1.Delivery("Broadcast")},
		},
		{
			ObjectMeta: metav1.ObjectMeta{Name: anyone, Namespace: s.ns},
			Spec: podipcv1alpha1.ChannelSpec{LocalPort: 7001, Delivery: podipcv1alpha1.Delivery("AnyOne"),
				Overflow: podipcv1alpha1.Overflow{MaxWait: &metav1.Duration{Duration: 10 * time.Second}}},
		},
	} {
		if err := kube.Create(t.Context(), ch); err != nil {
			t.Fatalf("create Channel %s: %v", ch.Name, err)
		}
	}
	for _, d := range []*appsv1.Deployment{
		streamDeployment(bcastApp, bcast, bcastReplicas, "127.0.0.1:7000", "-"),
		streamDeployment(anyApp, anyone, anyReplicas, "-", "127.0.0.1:7001"),
	} {
		d.Namespace = s.ns
		if err := kube.Create(t.Context(), d); err != nil {
			t.Fatal(err)
		}
	}
}

func streamDeployment(name, channel string, replicas int32, bcastAddr, anyAddr string) *appsv1.Deployment {
	labels := map[string]string{"app": name, "role": "stream"}
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr.To(replicas),
			Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": name}},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels, Annotations: map[string]string{
					"podipc.dev/inject": "true", "podipc.dev/channels": channel,
				}},
				Spec: corev1.PodSpec{
					// The sidecar flushes and says goodbye on SIGTERM; give it the time it asks for.
					TerminationGracePeriodSeconds: ptr.To[int64](10),
					Containers: []corev1.Container{{
						Name:            "app",
						Image:           testappImage,
						ImagePullPolicy: corev1.PullNever,
						Args:            []string{"stream", bcastAddr, anyAddr, itoa(rate), ":" + reportPort},
						SecurityContext: &corev1.SecurityContext{
							AllowPrivilegeEscalation: ptr.To(false),
							RunAsNonRoot:             ptr.To(true),
							RunAsUser:                ptr.To[int64](65532),
							ReadOnlyRootFilesystem:   ptr.To(true),
							Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
							SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
						},
					}},
				},
			},
		},
	}
}

// restore undoes every fault now (the harness also does on cleanup and before teardown).
func (s *suite) restore(t *testing.T) {
	t.Helper()
	if err := fault("restore"); err != nil {
		t.Error(err)
	}
}

// run settles the streams, makes the fault, waits until traffic is back to its rate, and
// accounts for the lines of the fault on both channels.
func (s *suite) run(t *testing.T, fc faultCase) []result {
	defer s.restore(t)
	first := s.settle(t)
	victims := s.victims(t)
	t.Logf("victims: %s, %s", victims[0].Name, victims[1].Name)
	p := s.startPolling(first)
	defer p.cancel()
	lease := s.leaseBefore(t, fc)
	start := time.Now()
	fc.inject(t, s, victims)
	end := time.Now()
	membershipDone := s.measureMembership(end)
	controllerDone := s.measureController(lease, end)

	// The first poll after the fault (the API server may only now answer again), then until
	// every receiver has every line that was sent when the fault ended.
	var ref *snapshot
	waitFor(t, "a poll after the fault", func(ctx context.Context) (bool, string) {
		snap, err := poll(ctx, s.ns)
		if err != nil || len(snap.pods) == 0 {
			return false, fmt.Sprint(err)
		}
		ref = snap
		return true, ""
	})
	var caught *snapshot
	waitFor(t, "traffic back to its rate", func(ctx context.Context) (bool, string) {
		snap, err := poll(ctx, s.ns)
		if err != nil {
			return false, err.Error()
		}
		ok, behind := caughtUp(ref, snap, first)
		caught = snap
		return ok, behind
	})
	catchUp := caught.at.Sub(end)
	// Lines still in flight (AnyOne lines may wait up to maxWait) settle before the count.
	time.Sleep(12 * time.Second)
	p.stop(t, s.ns)
	s.addFinal(p.tally)
	m := <-membershipDone
	ctl := <-controllerDone
	nodeFlipped := nodeReadyChangedSince(start)

	victimSet := map[string]bool{victims[0].Name: true, victims[1].Name: true}
	k, kills, unexpected := judgedAs(fc, victims, p.tally)
	var out []result
	for _, ch := range []string{bcast, anyone} {
		r := account(k, ch, victimSet, kills, first, caught, p.tally)
		r.fault, r.catchUp, r.membership = fc.name, catchUp, m.caughtUp
		for _, u := range unexpected {
			r.violatef("%s", u)
		}
		for name, n := range kills {
			if n > 0 && fc.kind == controlPlane {
				r.violatef("the sidecar of %s restarted %d× while the control plane was down", name, n)
			}
		}
		if fc.kind == controlPlane {
			if m.podsReady > 0 {
				r.notes = append(r.notes, fmt.Sprintf("pods not Ready after the fault%s; all Ready again in the API %s after it, the Channels counted them %s after that",
					nodeFlipped, m.podsReady.Round(time.Second), m.lag().Round(time.Second)))
			}
			if m.lag() > membershipBound {
				r.violatef("the Channels counted every pod ready %s after the API server listed them all Ready, beyond %s", m.lag().Round(time.Second), membershipBound)
			}
		}
		if ctl.measured {
			r.notes = append(r.notes, fmt.Sprintf("kubernetes Service routed again %s after the fault; controller leading again %s after the fault (%s after the route), %d restart(s)",
				ctl.routed.Round(time.Second), ctl.leading.Round(time.Second), ctl.afterRoute().Round(time.Second), ctl.restarts))
			if ctl.afterRoute() > membershipBound {
				r.violatef("the controller led again %s after the kubernetes Service routed again, beyond %s", ctl.afterRoute().Round(time.Second), membershipBound)
			}
		}
		for _, v := range r.violations {
			t.Errorf("%s on %s: %s", fc.name, ch, v)
		}
		t.Logf("%s on %s: sent %d delivered %d not addressed (receiver not Ready) %d lost %d (of which unacknowledged at a dead sender %d) dropped %v duplicated %d reordered %d; back to rate %s, membership %s; %v",
			fc.name, ch, r.sent, r.delivered, r.unaddressed, r.lost, r.uncountedOK, r.dropped, r.duplicated, r.reordered,
			catchUp.Round(100*time.Millisecond), m.caughtUp.Round(time.Second), r.notes)
		out = append(out, r)
	}
	if t.Failed() {
		s.dumpSidecarLogs(t, victims)
	}
	s.mu.Lock()
	for pod, lines := range s.exitLogs {
		if t.Failed() {
			t.Logf("sidecar log of %s from its deletion on:\n%s", pod, strings.Join(lines, "\n"))
		}
	}
	s.exitLogs = nil
	s.mu.Unlock()
	return out
}

// judgedAs is the kind the lines of a fault are judged by, how often each victim's sidecar
// died, and the restarts the fault did not make. The sidecar has no liveness probe (it would
// cross the pod network: docs/design.md §6.2), so no fault but a kill restarts it; if one
// does, the lines are judged by the sidecar-restart rules, (b) and (c), and run fails the
// fault.
func judgedAs(fc faultCase, victims []*corev1.Pod, tl *tally) (kind, map[string]int, []string) {
	k, kills := fc.kind, map[string]int{}
	var unexpected []string
	for _, v := range victims {
		n := tl.restartsOf(v.Name)
		kills[v.Name] = max(fc.kills, n)
		if n > fc.kills {
			unexpected = append(unexpected, fmt.Sprintf("the sidecar of %s restarted %d× more than it was killed", v.Name, n-fc.kills))
		}
		if n > 0 && fc.kind == network {
			k = sidecarKill
		}
	}
	return k, kills, unexpected
}

// settle waits until both Deployments have all their pods ready, membership lists them, and
// every receiver is up to date with every sender; it returns that poll.
func (s *suite) settle(t *testing.T) *snapshot {
	t.Helper()
	s.waitMembership(t)
	var ref, last *snapshot
	waitFor(t, "streams settled", func(ctx context.Context) (bool, string) {
		snap, err := poll(ctx, s.ns)
		if err != nil {
			return false, err.Error()
		}
		if len(snap.pods) != bcastReplicas+anyReplicas {
			return false, fmt.Sprintf("%d pods answer", len(snap.pods))
		}
		if ref == nil || len(ref.pods) != len(snap.pods) {
			ref = snap
			return false, "first poll"
		}
		ok, behind := caughtUp(ref, snap, ref)
		last = snap
		if !ok {
			ref = snap
		}
		return ok, behind
	})
	return last
}

// waitMembership waits until both Deployments have exactly their replicas, all ready, and
// both Channels count them all ready; it returns how long that took.
func (s *suite) waitMembership(t *testing.T) time.Duration {
	t.Helper()
	return waitFor(t, "membership", s.membershipState)
}

// membership is what measureMembership found after a fault: when both Channels counted every
// pod ready (caughtUp), and when the pods themselves were last all Ready again in the API
// (podsReady), both from the fault's end. The second is Kubernetes' doing, not podipc's: an API
// server away for longer than kube-controller-manager's node-monitor-grace-period (50 s) lets
// the kubelet's node lease lapse, the node lifecycle controller then marks the node and every
// pod on it NotReady as soon as it can reach the API server again, and the pods are Ready
// again only once the kubelet has noticed and written their status back.
type membership struct {
	caughtUp, podsReady time.Duration
}

// lag is what podipc's controller controls: how long the Channels took to count the pods
// ready after the API server listed them all ready.
func (m membership) lag() time.Duration { return max(m.caughtUp-m.podsReady, 0) }

// measureMembership polls, twice a second, until both Channels count every pod ready
// (settleTimeout if they never do). podsReady is 0 while every poll finds every pod Ready;
// once one does not, it is the poll that next finds them all Ready again.
func (s *suite) measureMembership(since time.Time) <-chan membership {
	out := make(chan membership, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), settleTimeout)
		defer cancel()
		readySince := since
		for ctx.Err() == nil {
			podsOK, chOK, _ := s.readiness(ctx)
			switch {
			case !podsOK:
				readySince = time.Time{}
			case readySince.IsZero():
				readySince = time.Now()
			}
			if podsOK && chOK {
				out <- membership{caughtUp: time.Since(since), podsReady: readySince.Sub(since)}
				return
			}
			time.Sleep(500 * time.Millisecond)
		}
		m := membership{caughtUp: settleTimeout, podsReady: settleTimeout}
		if !readySince.IsZero() {
			m.podsReady = readySince.Sub(since)
		}
		out <- m
	}()
	return out
}

// membershipState is true when both Deployments have exactly their replicas, all Ready, and
// both Channels count them all ready.
func (s *suite) membershipState(ctx context.Context) (bool, string) {
	podsOK, chOK, state := s.readiness(ctx)
	return podsOK && chOK, state
}

// readiness reads both Deployments' pods and both Channels: podsOK when each Deployment has
// exactly its replicas, all Ready and none deleted; channelsOK when each Channel counts them
// all as members and ready.
func (s *suite) readiness(ctx context.Context) (podsOK, channelsOK bool, state string) {
	var states []string
	podsOK, channelsOK = true, true
	for _, c := range []struct {
		app, channel string
		n            int32
	}{{bcastApp, bcast, bcastReplicas}, {anyApp, anyone, anyReplicas}} {
		pods, err := s.pods(ctx, c.app)
		if err != nil {
			return false, false, err.Error()
		}
		ready := 0
		for _, p := range pods {
			if p.DeletionTimestamp == nil && podReady(&p) {
				ready++
			}
		}
		var ch podipcv1alpha1.Channel
		if err := kube.Get(ctx, ctrlclient.ObjectKey{Namespace: s.ns, Name: c.channel}, &ch); err != nil {
			return false, false, err.Error()
		}
		pOK := len(pods) == int(c.n) && ready == int(c.n)
		cOK := ch.Status.Members == c.n && ch.Status.ReadyMembers == c.n
		podsOK, channelsOK = podsOK && pOK, channelsOK && cOK
		if !pOK || !cOK {
			states = append(states, fmt.Sprintf("%s: %d pods, %d ready, channel members %d ready %d",
				c.app, len(pods), ready, ch.Status.Members, ch.Status.ReadyMembers))
		}
	}
	return podsOK, channelsOK, strings.Join(states, "; ")
}

// nodeReadyChangedSince says, for the verdict, whether the node's Ready condition changed
// since the fault began: kube-controller-manager marks a node whose lease lapsed (the API server
// away for longer than its node-monitor-grace-period), and every pod on it, NotReady.
func nodeReadyChangedSince(since time.Time) string {
	nodes, err := clientset.CoreV1().Nodes().List(context.Background(), metav1.ListOptions{})
	if err != nil {
		return ""
	}
	for _, n := range nodes.Items {
		for _, c := range n.Status.Conditions {
			if c.Type == corev1.NodeReady && c.LastTransitionTime.After(since) {
				return fmt.Sprintf(" (the node's Ready condition last changed %s after the fault began: kube-controller-manager marks a node whose lease lapsed, and its pods, NotReady)",
					c.LastTransitionTime.Sub(since).Round(time.Second))
			}
		}
	}
	return ""
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func (s *suite) pods(ctx context.Context, app string) ([]corev1.Pod, error) {
	list, err := clientset.CoreV1().Pods(s.ns).List(ctx, metav1.ListOptions{LabelSelector: "app=" + app})
	if err != nil {
		return nil, err
	}
	slices.SortFunc(list.Items, func(a, b corev1.Pod) int { return strings.Compare(a.Name, b.Name) })
	return list.Items, nil
}

// victims are the first pod of each Deployment by name.
func (s *suite) victims(t *testing.T) []*corev1.Pod {
	t.Helper()
	var out []*corev1.Pod
	for _, app := range []string{bcastApp, anyApp} {
		pods, err := s.pods(t.Context(), app)
		if err != nil || len(pods) == 0 {
			t.Fatalf("pods of %s: %v (%d)", app, err, len(pods))
		}
		out = append(out, &pods[0])
	}
	return out
}

// poller polls every pod once a second while a fault runs, so that the tally sees a deleted
// pod's last state and every drop a restarted sidecar counted before it was killed.
type poller struct {
	tally  *tally
	mu     sync.Mutex
	cancel context.CancelFunc
	done   chan struct{}
}

func (s *suite) startPolling(first *snapshot) *poller {
	ctx, cancel := context.WithCancel(context.Background())
	p := &poller{tally: newTally(first), cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			if snap, err := poll(ctx, s.ns); err == nil {
				p.mu.Lock()
				p.tally.add(snap)
				p.mu.Unlock()
			}
		}
	}()
	return p
}

// stop ends the polling with one last poll.
func (p *poller) stop(t *testing.T, ns string) {
	t.Helper()
	p.cancel()
	<-p.done
	snap, err := poll(t.Context(), ns)
	if err != nil {
		t.Fatalf("last poll: %v", err)
	}
	p.tally.add(snap)
}

func (s *suite) dumpSidecarLogs(t *testing.T, victims []*corev1.Pod) {
	t.Helper()
	for _, v := range victims {
		b, err := clientset.CoreV1().Pods(s.ns).GetLogs(v.Name, &corev1.PodLogOptions{Container: sidecar, TailLines: ptr.To[int64](40)}).DoRaw(context.Background())
		if err == nil {
			t.Logf("sidecar log of %s (tail):\n%s", v.Name, b)
		}
	}
}

// killSidecars SIGKILLs each victim's sidecar n times, waiting for the kubelet to restart it
// (native sidecar, restartPolicy Always) and for it to be ready between kills.
func killSidecars(n int) func(*testing.T, *suite, []*corev1.Pod) {
	return func(t *testing.T, s *suite, victims []*corev1.Pod) {
		for range n {
			want := map[string]int32{}
			for _, v := range victims {
				p, err := clientset.CoreV1().Pods(s.ns).Get(t.Context(), v.Name, metav1.GetOptions{})
				if err != nil {
					t.Fatal(err)
				}
				want[v.Name] = sidecarRestarts(p) + 1
				mustFault(t, "kill", containerID(p, sidecar))
			}
			waitFor(t, "sidecars restarted and ready", func(ctx context.Context) (bool, string) {
				for name, w := range want {
					p, err := clientset.CoreV1().Pods(s.ns).Get(ctx, name, metav1.GetOptions{})
					if err != nil || sidecarRestarts(p) < w || !podReady(p) {
						return false, fmt.Sprintf("%s: %v", name, err)
					}
				}
				return true, ""
			})
			time.Sleep(5 * time.Second)
		}
	}
}

func containerID(p *corev1.Pod, name string) string {
	for _, c := range append(p.Status.InitContainerStatuses, p.Status.ContainerStatuses...) {
		if c.Name == name {
			_, id, _ := strings.Cut(c.ContainerID, "://")
			return id
		}
	}
	return ""
}

// deletePods deletes the victims while they send (grace nil: the pod's own 10 s) and waits
// until they are gone; their Deployments replace them. It follows each victim's sidecar log
// meanwhile, for the drop totals the sidecar logs as it exits.
func deletePods(grace *int64) func(*testing.T, *suite, []*corev1.Pod) {
	return func(t *testing.T, s *suite, victims []*corev1.Pod) {
		var followers sync.WaitGroup
		defer followers.Wait()
		for _, v := range victims {
			logs, err := s.sidecarLog(v.Name)
			if err != nil {
				t.Logf("following the sidecar log of %s: %v", v.Name, err)
				continue
			}
			followers.Add(1)
			go func() {
				defer followers.Done()
				s.readExit(v.Name, logs)
			}()
		}
		for _, v := range victims {
			if err := clientset.CoreV1().Pods(s.ns).Delete(t.Context(), v.Name, metav1.DeleteOptions{GracePeriodSeconds: grace}); err != nil {
				t.Fatal(err)
			}
		}
		waitFor(t, "victims gone", func(ctx context.Context) (bool, string) {
			for _, v := range victims {
				if _, err := clientset.CoreV1().Pods(s.ns).Get(ctx, v.Name, metav1.GetOptions{}); err == nil {
					return false, v.Name + " still there"
				}
			}
			return true, ""
		})
		time.Sleep(5 * time.Second)
	}
}

// stopDaemon stops a node daemon for d while traffic flows and starts it again.
func stopDaemon(name string, d time.Duration) func(*testing.T, *suite, []*corev1.Pod) {
	return func(t *testing.T, s *suite, _ []*corev1.Pod) {
		defer s.restore(t)
		mustFault(t, "stop", name)
		time.Sleep(d)
		mustFault(t, "start", name)
		waitFor(t, "API server back", func(ctx context.Context) (bool, string) {
			_, err := clientset.CoreV1().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
			return err == nil, fmt.Sprint(err)
		})
		time.Sleep(5 * time.Second)
	}
}

// killController SIGKILLs the controller's container; the kubelet restarts it. The controller
// may just have restarted by itself (it exits when it loses its leader lease, e.g. while the
// API server was down), so it is first waited for to be ready, and the kill retried on a
// container that is already gone.
func killController(t *testing.T, _ *suite, _ []*corev1.Pod) {
	var pod *corev1.Pod
	var before int32
	waitFor(t, "controller ready and killed", func(ctx context.Context) (bool, string) {
		pods, err := clientset.CoreV1().Pods(releaseNS).List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err.Error()
		}
		for i := range pods.Items {
			p := &pods.Items[i]
			if !strings.HasPrefix(p.Name, "podipc-controller-") || !podReady(p) || len(p.Status.ContainerStatuses) == 0 {
				continue
			}
			c := p.Status.ContainerStatuses[0]
			if err := fault("kill", containerID(p, c.Name)); err != nil {
				return false, err.Error()
			}
			pod, before = p, c.RestartCount
			return true, ""
		}
		return false, "no ready controller pod"
	})
	waitFor(t, "controller restarted and ready", func(ctx context.Context) (bool, string) {
		q, err := clientset.CoreV1().Pods(releaseNS).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		return q.Status.ContainerStatuses[0].RestartCount > before && podReady(q), "not yet"
	})
	time.Sleep(5 * time.Second)
}
