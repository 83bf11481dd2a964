package issuer_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	crand "crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/rand"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/clock"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/internal/testenv"
	"github.com/podipc/podipc/pkg/certs"
	"github.com/podipc/podipc/pkg/channel"
	"github.com/podipc/podipc/pkg/identity"
	"github.com/podipc/podipc/pkg/identity/issuer"
)

const (
	controllerNS = "podipc-system"
	trustDomain  = "test.local"
)

var (
	env       *testenv.Env
	clientset *kubernetes.Clientset
	// srv is the identity endpoint under test, serving on 127.0.0.1.
	srv *issuer.Server
	// endpoint is srv's URL.
	endpoint string
	// bundle reads the trust bundle as a sidecar does.
	bundle identity.BundleSource
	// secret holds the identity root.
	secret = types.NamespacedName{Namespace: controllerNS, Name: "podipc-identity"}
	// trustCM is the published bundle.
	trustCM = types.NamespacedName{Namespace: controllerNS, Name: "podipc-identity-trust"}
	// logs collects the issuer's log lines.
	logs logBuffer
)

// TestMain runs in a private network namespace where testenv.PodCIDR is local, so that
// real sidecars (TestSidecarsOverMTLS) run on pod addresses EndpointSlices accept.
func TestMain(m *testing.M) {
	testenv.EnterPodNetwork()
	testenv.Main(m, &env, startIssuer)
}

// logBuffer is a concurrency-safe sink of log lines.
type logBuffer struct {
	mu    sync.Mutex
	lines []string
}

func (b *logBuffer) add(prefix, args string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.lines = append(b.lines, prefix+" "+args)
}

// has reports whether a logged line contains every part.
func (b *logBuffer) has(parts ...string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, l := range b.lines {
		all := true
		for _, p := range parts {
			all = all && strings.Contains(l, p)
		}
		if all {
			return true
		}
	}
	return false
}

// startIssuer runs what the controller runs for identity: the leader's Rotator once (to
// create the root and publish the bundle), a Keypair and the endpoint.
func startIssuer(e *testenv.Env) (func(), error) {
	ctrl.SetLogger(logr.Discard()) // the Rotator logs through controller-runtime
	ctx, cancel := context.WithCancel(context.Background())
	clientset = kubernetes.NewForConfigOrDie(e.Config)
	if err := e.Client.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: controllerNS}}); err != nil {
		cancel()
		return nil, err
	}
	rotator := &certs.Rotator{
		Client: e.Client, Secret: secret, Clock: clock.RealClock{}, Name: "identity root",
		Publisher: &issuer.TrustBundle{Client: e.Client, ConfigMap: trustCM},
		Policy:    issuer.RootPolicy([]string{"127.0.0.1"}, time.Second),
	}
	if _, err := rotator.Sync(ctx); err != nil {
		cancel()
		return nil, fmt.Errorf("first rotation: %w", err)
	}
	kp := &certs.Keypair{Clientset: clientset, Secret: secret}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); _ = kp.Start(ctx) }()
	srv = &issuer.Server{
		Addr: "127.0.0.1:0", TrustDomain: trustDomain, Lifetime: 20 * time.Second,
		Keypair: kp, Reviewer: e.Client, Pods: e.Client, APIReader: e.Client,
		ChannelsOf: channel.ChannelsOf,
		// A generous pod limit: the renewal test renews several times.
		PodLimit: issuer.Limit{Rate: 5, Burst: 20},
		Log:      funcr.New(logs.add, funcr.Options{}),
		Metrics:  issuer.NewMetrics(prometheus.NewRegistry()),
	}
	if err := srv.Listen(); err != nil {
		cancel()
		return nil, err
	}
	endpoint = "https://" + srv.ListenAddr().String()
	go func() {
		defer wg.Done()
		if err := srv.Start(ctx); err != nil {
			fmt.Fprintln(os.Stderr, "identity endpoint:", err)
		}
	}()
	for kp.Signer() == nil {
		select {
		case <-time.After(30 * time.Second):
			cancel()
			return nil, fmt.Errorf("the Keypair never loaded the identity root")
		case <-time.After(20 * time.Millisecond):
		}
	}
	bundle = identity.ConfigMapBundle{Client: dynamic.NewForConfigOrDie(e.Config), Namespace: trustCM.Namespace, Name: trustCM.Name}
	return func() { cancel(); wg.Wait() }, nil
}

// member creates a namespace, a service account and a pod as the webhook leaves it
// (labelled injected, a sidecar naming channels); mutate adjusts the pod before creation.
func member(t *testing.T, mutate func(*corev1.Pod)) *corev1.Pod {
	t.Helper()
	ctx := t.Context()
	ns := "t-" + rand.String(8)
	if err := env.Client.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
		t.Fatal(err)
	}
	return podIn(t, ns, "app", mutate)
}

func podIn(t *testing.T, ns, sa string, mutate func(*corev1.Pod)) *corev1.Pod {
	t.Helper()
	ctx := t.Context()
	if err := env.Client.Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: sa}}); err != nil && !strings.Contains(err.Error(), "already exists") {
		t.Fatal(err)
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "pod-" + rand.String(6), Labels: map[string]string{podipcv1alpha1.InjectedLabel: "true"}},
		Spec: corev1.PodSpec{
			ServiceAccountName: sa,
			InitContainers: []corev1.Container{{
				Name: podipcv1alpha1.SidecarContainerName, Image: "sidecar:test",
				RestartPolicy: ptr.To(corev1.ContainerRestartPolicyAlways),
				Env:           []corev1.EnvVar{{Name: podipcv1alpha1.ChannelsEnv, Value: "orders"}},
			}},
			Containers: []corev1.Container{{Name: "app", Image: "app:test"}},
		},
	}
	if mutate != nil {
		mutate(pod)
	}
	if err := env.Client.Create(ctx, pod); err != nil {
		t.Fatal(err)
	}
	return pod
}

// tokenFor asks the API server for a token bound to pod, as the kubelet does for the
// projected volume.
func tokenFor(t *testing.T, pod *corev1.Pod, audience string) string {
	t.Helper()
	tr, err := clientset.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(t.Context(), pod.Spec.ServiceAccountName, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{
			Audiences:         []string{audience},
			ExpirationSeconds: ptr.To[int64](600),
			BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("TokenRequest for pod %s: %v", pod.Name, err)
	}
	return tr.Status.Token
}

// resign rewrites a real token's claims and signs it again, with the API server's own
// service-account key (signedBy nil) or another key.
func resign(t *testing.T, token string, edit func(map[string]any), signedBy *ecdsa.PrivateKey) string {
	t.Helper()
	parts := strings.Split(token, ".")
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	var claims map[string]any
	if err := json.Unmarshal(payload, &claims); err != nil {
		t.Fatal(err)
	}
	edit(claims)
	if payload, err = json.Marshal(claims); err != nil {
		t.Fatal(err)
	}
	key := signedBy
	if key == nil {
		key = apiServerSigningKey(t)
	}
	signing := parts[0] + "." + base64.RawURLEncoding.EncodeToString(payload)
	digest := sha256.Sum256([]byte(signing))
	r, s, err := ecdsa.Sign(crand.Reader, key, digest[:])
	if err != nil {
		t.Fatal(err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return signing + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// apiServerSigningKey is the key envtest's API server signs service-account tokens with.
func apiServerSigningKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(env.Environment.ControlPlane.APIServer.CertDir, "sa-signer.key"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(raw)
	if b == nil {
		t.Fatal("no PEM in sa-signer.key")
	}
	if k, err := x509.ParseECPrivateKey(b.Bytes); err == nil {
		return k
	}
	k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return k.(*ecdsa.PrivateKey)
}

// counted returns the refusals (or issues) counted with result so far.
func counted(result string) float64 {
	return testutil.ToFloat64(srv.Metrics.Requests.WithLabelValues(result))
}

// newClient returns a sidecar's identity client for pod, presenting token.
func newClient(t *testing.T, pod *corev1.Pod, token string) *identity.Client {
	t.Helper()
	file := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(file, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	return &identity.Client{
		URL: endpoint, TokenFile: file, TrustDomain: trustDomain, Bundle: bundle,
		Pod:           identity.Pod{Namespace: pod.Namespace, Name: pod.Name, UID: string(pod.UID)},
		BundleRefresh: 500 * time.Millisecond,
		Log:           logr.Discard(),
		Metrics:       identity.NewMetrics(prometheus.NewRegistry()),
	}
}

// run starts c until the test ends.
func run(t *testing.T, c *identity.Client) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("identity client: %v", err)
		}
	})
}

// pemBundle returns the bundle as published.
func pemBundle(t testing.TB) []byte {
	t.Helper()
	b, err := bundle.Bundle(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return bytes.TrimSpace(b)
}
