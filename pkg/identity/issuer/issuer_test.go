package issuer_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	crand "crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/podipc/podipc/internal/testenv"
	"github.com/podipc/podipc/pkg/identity"
	"github.com/podipc/podipc/pkg/identity/issuer"
)

// TestSidecarObtainsAndRenews runs a sidecar's identity client against the endpoint: it
// gets a certificate naming its service account and pod, a peer's check accepts it for
// that member only, and it is renewed before it expires.
func TestSidecarObtainsAndRenews(t *testing.T) {
	pod := member(t, nil)
	c := newClient(t, pod, tokenFor(t, pod, identity.Audience))
	run(t, c)
	select {
	case <-c.Ready():
	case <-time.After(30 * time.Second):
		t.Fatal("no certificate within 30 s")
	}
	first := c.Certificate()
	wantID := fmt.Sprintf("spiffe://%s/ns/%s/sa/app", trustDomain, pod.Namespace)
	if got := first.Leaf.URIs; len(got) != 1 || got[0].String() != wantID {
		t.Fatalf("URI SANs %v, want exactly %s", got, wantID)
	}
	self := identity.Pod{Namespace: pod.Namespace, Name: pod.Name, UID: string(pod.UID)}
	peer, err := c.Verify(first.Certificate, self)
	if err != nil {
		t.Fatalf("a peer refuses the certificate for its own member: %v", err)
	}
	if peer.ServiceAccount != "app" || peer.UID != string(pod.UID) {
		t.Fatalf("parsed %+v", peer)
	}
	other := self
	other.UID = "00000000-0000-0000-0000-000000000000"
	if _, err := c.Verify(first.Certificate, other); err == nil {
		t.Fatal("a peer accepts the certificate for another member's UID")
	}
	if exp := testutil.ToFloat64(c.Metrics.Expiry); int64(exp) != first.Leaf.NotAfter.Unix() {
		t.Fatalf("expiry metric %v, want %d", exp, first.Leaf.NotAfter.Unix())
	}
	// Lifetime 20 s: renewal is due after 8–10 s.
	deadline := time.Now().Add(25 * time.Second)
	for c.Certificate().Leaf.SerialNumber.Cmp(first.Leaf.SerialNumber) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the certificate was not renewed within 25 s of a 20 s lifetime")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if renewed := c.Certificate(); !renewed.Leaf.NotAfter.After(first.Leaf.NotAfter) {
		t.Fatalf("renewed certificate expires %s, not after the first's %s", renewed.Leaf.NotAfter, first.Leaf.NotAfter)
	}
}

// post sends one certificate request for pod with token (none if empty) and returns the
// HTTP status and the refusal.
func post(t *testing.T, url string, pod identity.Pod, token string, csrPEM string) (int, identity.Refusal) {
	t.Helper()
	if csrPEM == "" {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
		der, err := x509.CreateCertificateRequest(crand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: pod.UID}}, key)
		if err != nil {
			t.Fatal(err)
		}
		csrPEM = string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	}
	body, err := json.Marshal(identity.Request{CSR: csrPEM, Pod: pod})
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, url+identity.CertificatePath, bytes.NewReader(body))
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pemBundle(t))
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS13}}}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("posting: %v", err)
	}
	defer func() { _ = resp.Body.Close() }()
	raw, _ := io.ReadAll(resp.Body)
	var r identity.Refusal
	if resp.StatusCode != http.StatusOK {
		if err := json.Unmarshal(raw, &r); err != nil {
			t.Fatalf("refusal body %q: %v", raw, err)
		}
	}
	return resp.StatusCode, r
}

func ref(p *corev1.Pod) identity.Pod {
	return identity.Pod{Namespace: p.Namespace, Name: p.Name, UID: string(p.UID)}
}

// TestRefusals plays each attack on the endpoint and checks it is refused with its
// reason, counted, and logged; the honest request next to them is issued.
func TestRefusals(t *testing.T) {
	type attempt struct {
		pod   identity.Pod
		token string
		csr   string
	}
	cases := map[string]struct {
		arrange func(t *testing.T) attempt
		reason  string
		status  int
	}{
		"honest": {reason: identity.ResultIssued, status: http.StatusOK, arrange: func(t *testing.T) attempt {
			p := member(t, nil)
			return attempt{pod: ref(p), token: tokenFor(t, p, identity.Audience)}
		}},
		"no token": {reason: identity.ResultNoToken, status: http.StatusUnauthorized, arrange: func(t *testing.T) attempt {
			return attempt{pod: ref(member(t, nil))}
		}},
		"token of another pod": {reason: identity.ResultPodMismatch, status: http.StatusForbidden, arrange: func(t *testing.T) attempt {
			victim := member(t, nil)
			thief := podIn(t, victim.Namespace, "app", nil)
			return attempt{pod: ref(victim), token: tokenFor(t, thief, identity.Audience)}
		}},
		"expired token": {reason: identity.ResultTokenExpired, status: http.StatusUnauthorized, arrange: func(t *testing.T) attempt {
			p := member(t, nil)
			tok := resign(t, tokenFor(t, p, identity.Audience), func(c map[string]any) {
				past := time.Now().Add(-2 * time.Hour).Unix()
				c["iat"], c["nbf"], c["exp"] = past, past, past+600
			}, nil)
			return attempt{pod: ref(p), token: tok}
		}},
		"token of a deleted pod": {reason: identity.ResultPodNotFound, status: http.StatusUnauthorized, arrange: func(t *testing.T) attempt {
			p := member(t, nil)
			tok := tokenFor(t, p, identity.Audience)
			if err := env.Client.Delete(t.Context(), p, client.GracePeriodSeconds(0)); err != nil {
				t.Fatal(err)
			}
			testenv.Eventually(t, "the pod is gone", func() error {
				err := env.Client.Get(t.Context(), client.ObjectKeyFromObject(p), &corev1.Pod{})
				if apierrors.IsNotFound(err) {
					return nil
				}
				return fmt.Errorf("pod still there: %w", err)
			})
			return attempt{pod: ref(p), token: tok}
		}},
		"pod not injected": {reason: identity.ResultNotInjected, status: http.StatusForbidden, arrange: func(t *testing.T) attempt {
			p := member(t, func(p *corev1.Pod) { p.Labels = nil })
			return attempt{pod: ref(p), token: tokenFor(t, p, identity.Audience)}
		}},
		"host network pod": {reason: identity.ResultNotInjected, status: http.StatusForbidden, arrange: func(t *testing.T) attempt {
			p := member(t, func(p *corev1.Pod) { p.Spec.HostNetwork = true })
			return attempt{pod: ref(p), token: tokenFor(t, p, identity.Audience)}
		}},
		"no channels": {reason: identity.ResultNoChannels, status: http.StatusForbidden, arrange: func(t *testing.T) attempt {
			p := member(t, func(p *corev1.Pod) { p.Spec.InitContainers[0].Env = nil })
			return attempt{pod: ref(p), token: tokenFor(t, p, identity.Audience)}
		}},
		"wrong audience": {reason: identity.ResultWrongAudience, status: http.StatusUnauthorized, arrange: func(t *testing.T) attempt {
			p := member(t, nil)
			return attempt{pod: ref(p), token: tokenFor(t, p, "https://kubernetes.default.svc")}
		}},
		"forged token": {reason: identity.ResultTokenInvalid, status: http.StatusUnauthorized, arrange: func(t *testing.T) attempt {
			p := member(t, nil)
			key, _ := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
			return attempt{pod: ref(p), token: resign(t, tokenFor(t, p, identity.Audience), func(map[string]any) {}, key)}
		}},
		"token not bound to a pod": {reason: identity.ResultNotPodBound, status: http.StatusForbidden, arrange: func(t *testing.T) attempt {
			p := member(t, nil)
			tr, err := clientset.CoreV1().ServiceAccounts(p.Namespace).CreateToken(t.Context(), "app", &authenticationv1.TokenRequest{
				Spec: authenticationv1.TokenRequestSpec{Audiences: []string{identity.Audience}, ExpirationSeconds: ptr.To[int64](600)},
			}, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			return attempt{pod: ref(p), token: tr.Status.Token}
		}},
		"bad csr": {reason: identity.ResultBadRequest, status: http.StatusBadRequest, arrange: func(t *testing.T) attempt {
			p := member(t, nil)
			return attempt{pod: ref(p), token: tokenFor(t, p, identity.Audience), csr: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}
		}},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			a := tc.arrange(t)
			before := counted(tc.reason)
			status, r := post(t, endpoint, a.pod, a.token, a.csr)
			if status != tc.status || (tc.reason != identity.ResultIssued && r.Reason != tc.reason) {
				t.Fatalf("HTTP %d reason %q (%s), want HTTP %d reason %q", status, r.Reason, r.Message, tc.status, tc.reason)
			}
			if got := counted(tc.reason); got != before+1 {
				t.Fatalf("podipc_identity_requests_total{result=%q} went from %v to %v, want one more", tc.reason, before, got)
			}
			if tc.reason != identity.ResultIssued && !logs.has("Refused a workload certificate request", `"reason"="`+tc.reason+`"`, a.pod.Name) {
				t.Fatalf("the refusal (%s) of %s was not logged with its reason", tc.reason, a.pod.Name)
			}
		})
	}
}

// TestRateLimitPerSource runs an endpoint allowing a source two requests and checks the
// third is refused as rate_limited, counted, before any TokenReview.
func TestRateLimitPerSource(t *testing.T) {
	limited := &issuer.Server{
		Addr: "127.0.0.1:0", TrustDomain: trustDomain, Keypair: srv.Keypair,
		Reviewer: env.Client, Pods: env.Client, APIReader: env.Client, ChannelsOf: srv.ChannelsOf,
		SourceLimit: issuer.Limit{Rate: 0.001, Burst: 2},
		Log:         srv.Log, Metrics: issuer.NewMetrics(prometheus.NewRegistry()),
	}
	if err := limited.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- limited.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("identity endpoint: %v", err)
		}
	})
	url := "https://" + limited.ListenAddr().String()
	p := member(t, nil)
	tok := tokenFor(t, p, identity.Audience)
	for i := range 2 {
		if status, r := post(t, url, ref(p), tok, ""); status != http.StatusOK {
			t.Fatalf("request %d refused: %d %+v", i, status, r)
		}
	}
	status, r := post(t, url, ref(p), tok, "")
	if status != http.StatusTooManyRequests || r.Reason != identity.ResultRateLimited {
		t.Fatalf("third request: HTTP %d %+v, want 429 rate_limited", status, r)
	}
	if got := testutil.ToFloat64(limited.Metrics.Requests.WithLabelValues(identity.ResultRateLimited)); got != 1 {
		t.Fatalf("rate_limited counted %v times, want 1", got)
	}
	if !strings.Contains(r.Message, "127.0.0.1") {
		t.Fatalf("the refusal does not name the source: %q", r.Message)
	}
}
