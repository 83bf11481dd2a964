package channel_test

import (
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// BenchmarkMembership1000 measures how fast 1,000 pods turning Ready reach the
// EndpointSlices, and how many API writes the controller spends on it:
//
//	KUBEBUILDER_ASSETS=$PWD/bin/k8s/v1.37.2 go test -run='^$' -bench=BenchmarkMembership1000 -benchtime=1x ./pkg/channel/
//
// Each iteration creates a Channel and 1,000 member pods without IPs, then gives every
// pod an IP and readiness (8 writers in parallel, as kubelets would), and reports:
// settle-s, from the last pod's Ready write until every slice is correct (1,000 ready
// endpoints, each once, ≤100 per slice); total-s, from the first Ready write; and
// writes, the controller's creates/updates/patches/deletes, status included.
func BenchmarkMembership1000(b *testing.B) {
	const n = 1000
	for i := 0; b.Loop(); i++ {
		ns := newNamespace(b)
		name := fmt.Sprintf("bench-%d", i)
		newChannel(b, ns, name)
		pods := make([]*corev1.Pod, n)
		for j := range pods {
			pods[j] = sidecarPod(ns, fmt.Sprintf("pod-%04d", j), "", name)
			if err := env.Client.Create(b.Context(), pods[j]); err != nil {
				b.Fatal(err)
			}
		}
		time.Sleep(2 * time.Second) // let the pod creations (no IP: no members) settle

		before := writes.Load()
		start := time.Now()
		setAllReady(b, pods, 20+i, true)
		last := time.Now()
		for !slicesCorrect(b, ns, name, n) {
			time.Sleep(10 * time.Millisecond)
		}
		done := time.Now()
		time.Sleep(2 * time.Second) // count the trailing status writes too
		b.ReportMetric(done.Sub(last).Seconds(), "settle-s")
		b.ReportMetric(done.Sub(start).Seconds(), "total-s")
		b.ReportMetric(float64(writes.Load()-before), "writes")
	}
}

// slicesCorrect says whether the channel's slices list exactly n ready pods, each once,
// at most 100 per slice.
func slicesCorrect(b *testing.B, ns, name string, n int) bool {
	b.Helper()
	got := slicesOf(b, ns, name)
	eps, err := endpointsByPod(got)
	if err != nil || len(eps) != n {
		return false
	}
	for _, s := range got {
		if len(s.Endpoints) > 100 {
			b.Fatalf("slice %s holds %d endpoints", s.Name, len(s.Endpoints))
		}
	}
	for _, ep := range eps {
		if !*ep.Conditions.Ready {
			return false
		}
	}
	return true
}
