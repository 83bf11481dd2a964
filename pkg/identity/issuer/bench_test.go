package issuer_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/rand"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/pkg/certs"
	"github.com/podipc/podipc/pkg/channel"
	"github.com/podipc/podipc/pkg/identity"
	"github.com/podipc/podipc/pkg/identity/issuer"
)

// benchSidecars is how many sidecars ask at once (issue 13: "1,000 sidecars started at once
// all hold certificates within 10 s of the last one asking").
const benchSidecars = 1000

// BenchmarkIssuance starts benchSidecars identity clients at once against a dedicated
// endpoint wired as the controller wires it (cmd/podipc-controller/identity.go): pods read
// through a cache of injected pods, TokenReviews through a client configured as
// ctrl.GetConfig leaves it (issuer.ReviewerConfig). Each client has its own in-memory key
// and its own token bound to its own pod, for podipc's audience.
//
// Every client dials from 127.0.0.1, so the per-source rate limit (meant for the pods
// behind one node's SNAT) is lifted for this endpoint only; the per-pod limit stays.
// The trust bundle is read once and handed to every client: the benchmark measures
// issuance, not 1,000 ConfigMap reads.
//
// Reported: s_after_last_ask, from the last client's request (its first bundle read,
// which immediately precedes the request) to the last certificate held; s_total, from
// the start to the last certificate held.
func BenchmarkIssuance(b *testing.B) {
	ctx := b.Context()
	ns := "bench-" + rand.String(6)
	if err := env.Client.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
		b.Fatal(err)
	}
	if err := env.Client.Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "app"}}); err != nil {
		b.Fatal(err)
	}
	endpoint, stop := benchIssuer(b)
	defer stop()
	roots := pemBundle(b)
	for i := 0; i < b.N; i++ {
		pods, tokens := benchPods(b, ns, i)
		b.StartTimer()
		start := time.Now()
		asked := make([]time.Time, len(pods))
		held := make([]time.Time, len(pods))
		clients := make([]*identity.Client, len(pods))
		for j, pod := range pods {
			file := filepath.Join(b.TempDir(), "token")
			if err := os.WriteFile(file, []byte(tokens[j]), 0o600); err != nil {
				b.Fatal(err)
			}
			var once sync.Once
			clients[j] = &identity.Client{
				URL: endpoint, TokenFile: file, TrustDomain: trustDomain,
				Bundle: identity.BundleFunc(func(context.Context) ([]byte, error) {
					once.Do(func() { asked[j] = time.Now() })
					return roots, nil
				}),
				Pod:     identity.Pod{Namespace: pod.Namespace, Name: pod.Name, UID: string(pod.UID)},
				Log:     logr.Discard(),
				Metrics: identity.NewMetrics(prometheus.NewRegistry()),
			}
		}
		runCtx, cancel := context.WithCancel(ctx)
		var wg sync.WaitGroup
		gate := make(chan struct{})
		for j, c := range clients {
			wg.Go(func() {
				<-gate
				done := make(chan error, 1)
				go func() { done <- c.Start(runCtx) }()
				select {
				case <-c.Ready():
					held[j] = time.Now()
				case err := <-done:
					b.Errorf("client %d stopped: %v", j, err)
					return
				}
				if err := <-done; err != nil { // after cancel
					b.Errorf("client %d: %v", j, err)
				}
			})
		}
		close(gate)
		var lastHeld time.Time
		for j, c := range clients {
			select {
			case <-c.Ready():
			case <-time.After(5 * time.Minute):
				b.Fatalf("client %d holds no certificate after 5 min", j)
			}
		}
		cancel()
		wg.Wait()
		b.StopTimer()
		var lastAsk time.Time
		failed := 0.0
		for j, c := range clients {
			failed += testutil.ToFloat64(c.Metrics.Requests.WithLabelValues("error"))
			lastAsk = later(lastAsk, asked[j])
			lastHeld = later(lastHeld, held[j])
		}
		b.ReportMetric(lastHeld.Sub(lastAsk).Seconds(), "s_after_last_ask")
		b.ReportMetric(lastHeld.Sub(start).Seconds(), "s_total")
		b.ReportMetric(float64(len(pods)), "sidecars")
		b.ReportMetric(failed, "failed_asks")
	}
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// benchIssuer starts an endpoint as setupIdentity does, with the source limit lifted, and
// returns its URL once its pod cache has synced.
func benchIssuer(b *testing.B) (string, func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	stop := func() { cancel(); wg.Wait() }
	cfg := rest.CopyConfig(env.Config)
	cfg.QPS = -1 // as ctrl.GetConfig leaves it: no client-side limit, the API server's fairness decides
	direct, err := client.New(cfg, client.Options{Scheme: env.Scheme})
	if err != nil {
		b.Fatal(err)
	}
	podCache, err := cache.New(cfg, cache.Options{Scheme: env.Scheme, ByObject: channel.CacheByObject()})
	if err != nil {
		b.Fatal(err)
	}
	// The issuer reads pods only; ask the cache for the pod informer before it starts.
	if _, err := podCache.GetInformer(ctx, &corev1.Pod{}); err != nil {
		b.Fatal(err)
	}
	kp := &certs.Keypair{Clientset: clientset, Secret: secret}
	s := &issuer.Server{
		Addr: "127.0.0.1:0", TrustDomain: trustDomain, Lifetime: time.Hour,
		Keypair: kp, Reviewer: direct, Pods: podCache, APIReader: direct,
		ChannelsOf:  channel.ChannelsOf,
		SourceLimit: issuer.Limit{Rate: 1e6, Burst: 1e6},
		Log:         logr.Discard(),
		Metrics:     issuer.NewMetrics(prometheus.NewRegistry()),
	}
	if err := s.Listen(); err != nil {
		b.Fatal(err)
	}
	wg.Add(3)
	go func() { defer wg.Done(); _ = kp.Start(ctx) }()
	go func() { defer wg.Done(); _ = podCache.Start(ctx) }()
	go func() {
		defer wg.Done()
		if err := s.Start(ctx); err != nil {
			b.Errorf("identity endpoint: %v", err)
		}
	}()
	if !podCache.WaitForCacheSync(ctx) {
		stop()
		b.Fatal("the pod cache never synced")
	}
	for kp.Signer() == nil {
		time.Sleep(20 * time.Millisecond)
	}
	return "https://" + s.ListenAddr().String(), stop
}

// benchPods creates benchSidecars injected pods in ns and a token bound to each, with the
// timer stopped.
func benchPods(b *testing.B, ns string, round int) ([]*corev1.Pod, []string) {
	b.StopTimer()
	ctx := b.Context()
	pods := make([]*corev1.Pod, benchSidecars)
	tokens := make([]string, benchSidecars)
	errs := make(chan error, benchSidecars)
	sem := make(chan struct{}, 32)
	var wg sync.WaitGroup
	for i := range pods {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			pod := &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("pod-%d-%d", round, i), Labels: map[string]string{podipcv1alpha1.InjectedLabel: "true"}},
				Spec: corev1.PodSpec{
					ServiceAccountName: "app",
					InitContainers: []corev1.Container{{
						Name: podipcv1alpha1.SidecarContainerName, Image: "sidecar:test",
						RestartPolicy: ptr.To(corev1.ContainerRestartPolicyAlways),
						Env:           []corev1.EnvVar{{Name: podipcv1alpha1.ChannelsEnv, Value: "orders"}},
					}},
					Containers: []corev1.Container{{Name: "app", Image: "app:test"}},
				},
			}
			if err := env.Client.Create(ctx, pod); err != nil {
				errs <- err
				return
			}
			tr, err := clientset.CoreV1().ServiceAccounts(ns).CreateToken(ctx, "app", &authenticationv1.TokenRequest{
				Spec: authenticationv1.TokenRequestSpec{
					Audiences:         []string{identity.Audience},
					ExpirationSeconds: ptr.To[int64](600),
					BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
				},
			}, metav1.CreateOptions{})
			if err != nil {
				errs <- err
				return
			}
			pods[i], tokens[i] = pod, tr.Status.Token
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	return pods, tokens
}
