package channel_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
)

// The membership benchmarks measure how fast pods turning Ready reach the EndpointSlices,
// and what the controller spends on it:
//
//	KUBEBUILDER_ASSETS=$PWD/bin/k8s/v1.37.2 go test -run='^$' -bench='^BenchmarkMembership5000Over100$' -benchtime=1x -timeout=30m ./pkg/channel/
//
// (one benchmark per process for the memory figures: earlier benchmarks' pods stay cached).
// Each iteration creates the Channels and their member pods without IPs, then gives every
// pod an IP and readiness (8 writers in parallel, as kubelets would), and reports:
// settle-s, from the last pod's Ready write until every slice of every channel is correct
// (each channel's ready pods, each once, ≤100 per slice, no more slices than
// ⌈members/100⌉ + 1); total-s, from the first Ready write; writes, the controller's
// creates/updates/patches/deletes, status included; and heap-MB and peak-rss-MB of the
// test process, which holds the controller (its cache of every pod and slice) and the
// benchmark's own copies of the pods: the controller's share is below these.

// BenchmarkMembership1000: one Channel of 1,000 pods.
func BenchmarkMembership1000(b *testing.B) { benchMembership(b, 1, 1000) }

// BenchmarkMembership2000: one Channel of 2,000 pods.
func BenchmarkMembership2000(b *testing.B) { benchMembership(b, 1, 2000) }

// BenchmarkMembership5000Over100: 5,000 pods over 100 Channels of 50.
func BenchmarkMembership5000Over100(b *testing.B) { benchMembership(b, 100, 50) }

func benchMembership(b *testing.B, channels, perChannel int) {
	for i := 0; b.Loop(); i++ {
		ns := newNamespace(b)
		var pods []*corev1.Pod
		for c := range channels {
			name := fmt.Sprintf("bench-%d-%d", i, c)
			newChannel(b, ns, name)
			for j := range perChannel {
				pods = append(pods, sidecarPod(ns, fmt.Sprintf("pod-%d-%04d", c, j), "", name))
			}
		}
		createAll(b, pods)
		time.Sleep(2 * time.Second) // let the pod creations (no IP: no members) settle

		before := writes.Load()
		start := time.Now()
		setAllReady(b, pods, 20+i, true)
		last := time.Now()
		for !allSlicesCorrect(b, ns, channels, perChannel) {
			time.Sleep(10 * time.Millisecond)
		}
		done := time.Now()
		time.Sleep(2 * time.Second) // count the trailing status writes too
		b.ReportMetric(done.Sub(last).Seconds(), "settle-s")
		b.ReportMetric(done.Sub(start).Seconds(), "total-s")
		b.ReportMetric(float64(writes.Load()-before), "writes")
	}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	b.ReportMetric(float64(ms.HeapInuse)/1e6, "heap-MB")
	b.ReportMetric(float64(peakRSS())/1e6, "peak-rss-MB")
}

// createAll creates the pods with 8 writers in parallel.
func createAll(b *testing.B, pods []*corev1.Pod) {
	b.Helper()
	errs := make(chan error, len(pods))
	sem := make(chan struct{}, 8)
	for _, p := range pods {
		sem <- struct{}{}
		go func() {
			defer func() { <-sem }()
			errs <- env.Client.Create(context.Background(), p)
		}()
	}
	for range pods {
		if err := <-errs; err != nil {
			b.Fatal(err)
		}
	}
}

// allSlicesCorrect says whether each of the namespace's channels lists exactly n ready
// pods, each once, at most 100 per slice, in at most ⌈n/100⌉ + 1 slices. One list of the
// whole namespace per poll, so the poll costs the API server little.
func allSlicesCorrect(b *testing.B, ns string, channels, n int) bool {
	b.Helper()
	list := &discoveryv1.EndpointSliceList{}
	if err := env.Client.List(context.Background(), list, client.InNamespace(ns)); err != nil {
		b.Fatal(err)
	}
	byChannel := map[string][]discoveryv1.EndpointSlice{}
	for _, s := range list.Items {
		byChannel[s.Labels[podipcv1alpha1.ChannelLabel]] = append(byChannel[s.Labels[podipcv1alpha1.ChannelLabel]], s)
	}
	if len(byChannel) != channels {
		return false
	}
	for _, got := range byChannel {
		if !slicesHold(b, got, n) {
			return false
		}
	}
	return true
}

// slicesHold says whether one channel's slices list exactly n ready pods, each once.
func slicesHold(b *testing.B, got []discoveryv1.EndpointSlice, n int) bool {
	eps, err := endpointsByPod(got)
	if err != nil || len(eps) != n || len(got) > (n+99)/100+1 {
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

// peakRSS reads the test process's peak resident set (VmHWM) in bytes.
func peakRSS() int64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer func() { _ = f.Close() }()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}
