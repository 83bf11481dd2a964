package inject

import (
	"encoding/json"
	"fmt"
	"slices"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"
)

// BenchmarkAdmission measures pod CREATE latency through the real API server, with the
// webhook injecting ("injected") and for a pod the webhook is never called for ("baseline",
// no annotation, plain namespace); the difference is the webhook's share. It reports p50 and
// p99 in milliseconds. Run:
//
//	make control-plane && KUBEBUILDER_ASSETS=$PWD/bin/k8s/v1.37.2 \
//	  go test ./pkg/inject -run '^$' -bench Admission -benchtime 2000x
func BenchmarkAdmission(b *testing.B) {
	for _, tc := range []struct {
		name        string
		annotations map[string]string
	}{
		{"baseline", nil},
		{"injected", optIn},
	} {
		b.Run(tc.name, func(b *testing.B) {
			ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "bench-"}}
			if err := env.Client.Create(b.Context(), ns); err != nil {
				b.Fatal(err)
			}
			for {
				m := &metav1.PartialObjectMetadata{}
				m.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("Namespace"))
				if hook.Reader.Get(b.Context(), client.ObjectKey{Name: ns.Name}, m) == nil {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			lat := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for i := range b.N {
				pod := newPod(ns.Name, fmt.Sprintf("p%d", i), tc.annotations)
				start := time.Now()
				if err := env.Client.Create(b.Context(), pod); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(start))
				if (pod.Labels[LabelInjected] == "true") != (tc.annotations != nil) {
					b.Fatal("unexpected injection result")
				}
			}
			b.StopTimer()
			slices.Sort(lat)
			ms := func(q float64) float64 { return float64(lat[int(q*float64(len(lat)-1))]) / float64(time.Millisecond) }
			b.ReportMetric(ms(0.50), "p50-ms")
			b.ReportMetric(ms(0.99), "p99-ms")
		})
	}
}

// BenchmarkHandler measures the webhook's own work for one injected pod (decode, decide,
// cached namespace read, inject, JSON patch), without TLS or the API server.
func BenchmarkHandler(b *testing.B) {
	pod := newPod(metav1.NamespaceDefault, "p", optIn)
	raw, err := json.Marshal(pod)
	if err != nil {
		b.Fatal(err)
	}
	h := hook.Handler(env.Scheme)
	req := admission.Request{AdmissionRequest: admissionv1.AdmissionRequest{
		UID: "bench", Operation: admissionv1.Create, Namespace: pod.Namespace,
		Kind:     metav1.GroupVersionKind{Version: "v1", Kind: "Pod"},
		Resource: metav1.GroupVersionResource{Version: "v1", Resource: "pods"},
		Object:   runtime.RawExtension{Raw: raw},
	}}
	b.ReportAllocs()
	for b.Loop() {
		if resp := h.Handle(b.Context(), req); len(resp.Patches) == 0 {
			b.Fatal("no patch")
		}
	}
}
