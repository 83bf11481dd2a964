//go:build e2efaults

package faults

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrlclient "sigs.k8s.io/controller-runtime/pkg/client"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
)

// The memory squeeze (issue 16's real-node test): a Broadcast channel of six pods whose
// sidecars are limited to squeezeLimit, one of which floods 1 KiB lines as fast as its
// sidecar takes them while the five others read slowly. The channel's queueBytes
// (squeezeQueue per receiver) would let the flooding sidecar hold five of them in its link
// windows, more than its memory limit: only the memory budget (half the limit, docs/design.md
// §8.7) keeps it from being OOM-killed. It must hold: no sidecar restarts (no OOM kill),
// and every line a sink misses is counted dropped on some sidecar.
const (
	flood        = "flood" // Broadcast, local port 7002
	floodSink    = "flood-sink"
	floodSend    = "flood-send"
	floodSinks   = 5
	squeezeLimit = "48Mi"
	squeezeQueue = 8 << 20
	floodSeconds = 20
)

func squeezeDeployment(name string, replicas int32, role string) *appsv1.Deployment {
	d := streamDeployment(name, flood, replicas, "-", "-")
	tpl := &d.Spec.Template
	tpl.Labels["role"] = flood // not polled by the streaming faults
	tpl.Annotations["podipc.dev/sidecar-memory-limit"] = squeezeLimit
	tpl.Spec.Containers[0].Args = []string{"flood", "127.0.0.1:7002", role, itoa(floodSeconds), ":" + reportPort}
	return d
}

// memorySqueeze runs the squeeze and returns its row of the report.
func memorySqueeze(t *testing.T, s *suite) []result {
	const name = "memory squeeze (6 pods, sidecars limited to " + squeezeLimit + ", one floods)"
	r := result{fault: name, channel: flood, dropped: map[string]float64{}}
	ch := &podipcv1alpha1.Channel{
		ObjectMeta: metav1.ObjectMeta{Name: flood, Namespace: s.ns},
		Spec: podipcv1alpha1.ChannelSpec{LocalPort: 7002, Delivery: podipcv1alpha1.Delivery("Broadcast"),
			Overflow: podipcv1alpha1.Overflow{QueueBytes: squeezeQueue}},
	}
	if err := kube.Create(t.Context(), ch); err != nil {
		t.Fatalf("create Channel %s: %v", flood, err)
	}
	create := func(d *appsv1.Deployment) {
		d.Namespace = s.ns
		if err := kube.Create(t.Context(), d); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = kube.Delete(context.Background(), d)
		})
	}
	channelReady := func(n int32) {
		waitFor(t, fmt.Sprintf("%d flood members ready", n), func(ctx context.Context) (bool, string) {
			var c podipcv1alpha1.Channel
			if err := kube.Get(ctx, ctrlclient.ObjectKey{Namespace: s.ns, Name: flood}, &c); err != nil {
				return false, err.Error()
			}
			return c.Status.ReadyMembers == n, fmt.Sprintf("%d of %d ready", c.Status.ReadyMembers, c.Status.Members)
		})
	}
	// The sinks first, so that the sender's sidecar knows them all when its app starts.
	create(squeezeDeployment(floodSink, floodSinks, "sink"))
	channelReady(floodSinks)
	start := time.Now()
	create(squeezeDeployment(floodSend, 1, "send"))
	channelReady(floodSinks + 1)

	// Poll until the sinks' counts and the drop counters stop moving after the flood.
	var (
		sender         string
		sent           int
		peakUsed       float64
		budget         float64
		last           string
		stable         int
		recv           map[string]*flowReport
		drops          map[string]float64
		restarts       map[string]int32
		oomKilled      []string
		memUsedPattern = "podipc_memory_used_bytes "
	)
	waitFor(t, "flood over and settled", func(ctx context.Context) (bool, string) {
		pods, err := clientset.CoreV1().Pods(s.ns).List(ctx, metav1.ListOptions{LabelSelector: "role=" + flood})
		if err != nil {
			return false, err.Error()
		}
		recv, drops, restarts, oomKilled = map[string]*flowReport{}, map[string]float64{}, map[string]int32{}, nil
		var state []string
		for i := range pods.Items {
			p := &pods.Items[i]
			restarts[p.Name] = sidecarRestarts(p)
			for _, cs := range append(p.Status.InitContainerStatuses, p.Status.ContainerStatuses...) {
				if t := cs.LastTerminationState.Terminated; t != nil && t.Reason == "OOMKilled" {
					oomKilled = append(oomKilled, p.Name+"/"+cs.Name)
				}
			}
			rep, met := readFlood(ctx, s.ns, p.Name)
			if rep == nil || met == "" {
				return false, p.Name + " does not answer"
			}
			for k, v := range droppedLines(met) {
				if c, reason, _ := strings.Cut(k, "/"); c == flood {
					drops[reason] += v
				}
			}
			if strings.HasPrefix(p.Name, floodSend+"-") {
				sender, sent = rep.Me, rep.Sent[flood]
				budget = metricValue(met, "podipc_memory_budget_bytes ")
				peakUsed = max(peakUsed, metricValue(met, memUsedPattern))
				continue
			}
			f := rep.Recv[flood][sender]
			if sender == "" {
				return false, "sender not read yet"
			}
			recv[p.Name] = &f
			state = append(state, fmt.Sprintf("%s %d", p.Name, f.Received))
		}
		if sender == "" || len(recv) != floodSinks || time.Since(start) < floodSeconds*time.Second {
			return false, "flood not over"
		}
		now := fmt.Sprintf("sent %d; %s; drops %v", sent, strings.Join(state, ", "), drops)
		if now == last {
			stable++
		} else {
			stable = 0
		}
		last = now
		return stable >= 10, now
	})
	r.sent = sent
	for _, f := range recv {
		r.delivered += f.Received - f.Duplicates
		r.duplicated += f.Duplicates
		r.reordered += f.Reordered
		for n := 1; n <= sent; n++ {
			if !f.has(n) {
				r.lost++
			}
		}
	}
	r.dropped = drops
	counted := 0.0
	for reason, v := range drops {
		counted += v
		if reason != "memory_budget" && reason != "queue_full" {
			r.violatef("%v lines dropped %s: only memory_budget and the policy's queue_full are expected", v, reason)
		}
	}
	if float64(r.lost) > counted {
		r.violatef("%d lines lost and only %.0f counted as dropped: lines lost without being counted", r.lost, counted)
	}
	if r.duplicated > 0 || r.reordered > 0 {
		r.violatef("%d duplicated and %d reordered where Broadcast promises exactly once, in order", r.duplicated, r.reordered)
	}
	for p, n := range restarts {
		if n > 0 {
			r.violatef("the sidecar of %s restarted %d×", p, n)
		}
	}
	for _, c := range oomKilled {
		r.violatef("%s was OOM-killed", c)
	}
	if sent == 0 || r.delivered == 0 {
		r.violatef("the flood sent %d and delivered %d: the test proved nothing", sent, r.delivered)
	}
	r.notes = append(r.notes, fmt.Sprintf("delivered and lost are per sink (%d sinks); the flooding sidecar's podipc_memory_used_bytes peaked at %.1f MiB of a %.0f MiB budget, 0 restarts",
		floodSinks, peakUsed/(1<<20), budget/(1<<20)))
	for _, v := range r.violations {
		t.Errorf("%s: %s", name, v)
	}
	t.Logf("%s: sent %d ×%d delivered %d lost %d dropped %v duplicated %d reordered %d; %v", name, sent, floodSinks,
		r.delivered, r.lost, drops, r.duplicated, r.reordered, r.notes)
	return []result{r}
}

// readFlood reads a flood pod's report and its sidecar's metrics.
func readFlood(ctx context.Context, ns, pod string) (*appReport, string) {
	st := readPod(ctx, ns, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: pod}})
	met, err := proxyGet(ctx, ns, pod, "7702", "metrics")
	if err != nil {
		return st.report, ""
	}
	return st.report, string(met)
}

// metricValue returns the value of the first sample of text that starts with prefix.
func metricValue(text, prefix string) float64 {
	for _, line := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(line, prefix); ok {
			f, _ := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return f
		}
	}
	return 0
}
