package issuer_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/utils/clock"

	"github.com/podipc/podipc/internal/testenv"
	"github.com/podipc/podipc/pkg/certs"
	"github.com/podipc/podipc/pkg/identity"
	"github.com/podipc/podipc/pkg/identity/issuer"
)

// TestRootRotation rotates the identity root in real time (a root of 20 s replaced 10 s
// before it expires, published 2 s before it signs) while two sidecars renew 6 s
// certificates, and checks at every moment that each sidecar accepts the other's current
// certificate — the check a peer link makes at every handshake — and that no certificate
// came from a root before that root had been published for the propagation delay.
func TestRootRotation(t *testing.T) {
	if testing.Short() {
		t.Skip("rotates the identity root in real time for ~30 s")
	}
	url, cm, _ := rotatingIssuer(t, "rotating-identity")
	ctx := t.Context()
	// Root first published, by subject, as a sidecar would see it: sampled from the ConfigMap.
	src := identity.ConfigMapBundle{Client: dynamic.NewForConfigOrDie(env.Config), Namespace: cm.Namespace, Name: cm.Name}
	published := map[string]time.Time{}
	sample := func() {
		b, err := src.Bundle(ctx)
		if err != nil {
			return
		}
		for _, c := range parseAll(b) {
			if _, ok := published[c.Subject.CommonName]; !ok {
				published[c.Subject.CommonName] = time.Now()
			}
		}
	}
	testenvEventually(t, func() bool { sample(); return len(published) > 0 })
	// The first root signs at once: there was no bundle before it to overlap with.
	bootstrap := map[string]bool{}
	for root := range published {
		bootstrap[root] = true
	}

	a, b := member(t, nil), member(t, nil)
	var clients []*identity.Client
	for _, p := range []*identityPod{{a.Namespace, a.Name, string(a.UID), tokenFor(t, a, identity.Audience)}, {b.Namespace, b.Name, string(b.UID), tokenFor(t, b, identity.Audience)}} {
		c := newClient(t, a, p.token)
		c.Pod = identity.Pod{Namespace: p.ns, Name: p.name, UID: p.uid}
		c.URL = url
		c.Bundle, c.BundleRefresh = src, 100*time.Millisecond
		c.Log = funcr.New(func(prefix, args string) { t.Log(p.name, prefix, args) }, funcr.Options{})
		run(t, c)
		clients = append(clients, c)
		select {
		case <-c.Ready():
		case <-time.After(30 * time.Second):
			t.Fatal("no certificate within 30 s")
		}
	}
	issuers := map[string]bool{}
	end := time.Now().Add(25 * time.Second)
	for time.Now().Before(end) {
		sample()
		for i, c := range clients {
			cert := c.Certificate()
			root := cert.Leaf.Issuer.CommonName
			if !issuers[root] {
				issuers[root] = true
				at, ok := published[root]
				// The sampler polls every 20 ms: allow it that much lateness.
				if !bootstrap[root] && (!ok || time.Since(at) < rotatingPropagation-200*time.Millisecond) {
					t.Fatalf("a certificate from root %s was issued %s after the root was first seen published (want ≥ %s)", root, time.Since(at), rotatingPropagation)
				}
			}
			if time.Until(cert.Leaf.NotAfter) < 100*time.Millisecond {
				// A renewal late on a loaded machine is not what this test is about.
				t.Logf("sidecar %d's certificate is about to expire (renewal late)", i)
				continue
			}
			peer := clients[1-i]
			if _, err := peer.Verify(cert.Certificate, c.Pod); err != nil {
				t.Fatalf("sidecar %d refuses sidecar %d's current certificate (root %s): %v", 1-i, i, root, err)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(issuers) < 2 {
		t.Fatalf("certificates came from %d root(s) in 25 s: the root did not rotate", len(issuers))
	}
}

type identityPod struct{ ns, name, uid, token string }

func parseAll(b []byte) []*x509.Certificate {
	var out []*x509.Certificate
	for rest := b; ; {
		var blk *pem.Block
		if blk, rest = pem.Decode(rest); blk == nil {
			return out
		}
		if c, err := x509.ParseCertificate(blk.Bytes); err == nil {
			out = append(out, c)
		}
	}
}

func testenvEventually(t *testing.T, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); !ok(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the trust bundle was never published")
		}
	}
}

// rotatingLifetime is the lifetime of the certificates rotatingIssuer issues, and
// rotatingPropagation how long a new root is published before it signs.
const (
	rotatingLifetime    = 6 * time.Second
	rotatingPropagation = 2 * time.Second
)

// rotatingIssuer runs an identity endpoint whose root rotates every ~10 s (a 20 s root
// replaced 10 s before it expires, published 2 s before it signs) and issues 6 s
// certificates, until the test ends. Its root is the Secret name, its trust bundle the
// ConfigMap name-trust. It returns the endpoint's URL, that ConfigMap and its Keypair.
func rotatingIssuer(t *testing.T, name string) (string, types.NamespacedName, *certs.Keypair) {
	t.Helper()
	sec := types.NamespacedName{Namespace: controllerNS, Name: name}
	cm := types.NamespacedName{Namespace: controllerNS, Name: name + "-trust"}
	policy := issuer.RootPolicy([]string{"127.0.0.1"}, rotatingPropagation)
	policy.CAValidity, policy.CARenewBefore = 20*time.Second, 10*time.Second
	policy.CertValidity, policy.CertRenewBefore = 8*time.Second, 3*time.Second
	if err := issuer.ValidatePolicy(policy, rotatingLifetime); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })
	rotator := &certs.Rotator{
		Client: env.Client, Secret: sec, Clock: clock.RealClock{}, Name: "identity root", CheckInterval: 100 * time.Millisecond,
		Publisher: &issuer.TrustBundle{Client: env.Client, ConfigMap: cm}, Policy: policy,
	}
	kp := &certs.Keypair{Clientset: clientset, Secret: sec}
	s := &issuer.Server{
		// The sidecars dial the endpoint from their pod addresses.
		Addr: "127.0.0.1:0", TrustDomain: trustDomain, Lifetime: rotatingLifetime, Keypair: kp,
		Reviewer: env.Client, Pods: env.Client, APIReader: env.Client, ChannelsOf: srv.ChannelsOf,
		PodLimit: issuer.Limit{Rate: 50, Burst: 100}, Log: logr.Discard(), Metrics: issuer.NewMetrics(prometheus.NewRegistry()),
	}
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	for _, r := range []interface{ Start(context.Context) error }{rotator, kp, s} {
		wg.Go(func() { _ = r.Start(ctx) })
	}
	testenv.Eventually(t, "the rotating identity root is loaded", func() error {
		if kp.Signer() == nil {
			return fmt.Errorf("no signer yet")
		}
		return nil
	})
	return "https://" + s.ListenAddr().String(), cm, kp
}
