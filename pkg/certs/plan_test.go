package certs

import (
	"crypto/x509"
	"encoding/pem"
	"testing"
	"time"
)

func testPolicy() Policy {
	return Policy{
		Hosts:      []string{"podipc-webhook.podipc-system.svc", "127.0.0.1"},
		CAValidity: 10 * time.Hour, CARenewBefore: 3 * time.Hour,
		CertValidity: 2 * time.Hour, CertRenewBefore: 30 * time.Minute,
		PropagationDelay: 5 * time.Minute,
	}
}

// verifies reports whether certPEM is trusted by bundle for every host at now, as the API
// server would check it.
func verifies(t *testing.T, now time.Time, certPEM, bundle []byte, hosts []string) bool {
	t.Helper()
	c, err := parseCert(certPEM)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(bundle) {
		return false
	}
	for _, h := range hosts {
		if _, err := c.Verify(x509.VerifyOptions{Roots: pool, DNSName: h, CurrentTime: now}); err != nil {
			return false
		}
	}
	return true
}

func countCAs(bundle []byte) int {
	n := 0
	for rest := bundle; ; n++ {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			return n
		}
	}
}

// TestPlanKeepsTheOverlap drives Plan minute by minute through three CA lifetimes, publishing
// as the Rotator does, and checks at every step that the certificate a replica may still
// serve (old) and the one it may already serve (new) are both trusted by the caBundle the
// API server may still have (old) and the one it may already have (new).
func TestPlanKeepsTheOverlap(t *testing.T) {
	p := testPolicy()
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	cur, err := Plan(start, State{}, p)
	if err != nil {
		t.Fatal(err)
	}
	if !verifies(t, start, cur.Cert, cur.Bundle, p.Hosts) {
		t.Fatal("bootstrap certificate not trusted by its own bundle")
	}
	caRotations, certRotations, maxCAs := 0, 0, 1
	for now := start; now.Before(start.Add(30 * time.Hour)); now = now.Add(time.Minute) {
		next, err := Plan(now, cur, p)
		if err != nil {
			t.Fatal(err)
		}
		if len(next.NextCACert) > 0 && next.NextPublishedAt.IsZero() {
			next.NextPublishedAt = now // the Rotator publishes, then records the time
		}
		for _, cert := range [][]byte{cur.Cert, next.Cert} {
			for _, b := range [][]byte{cur.Bundle, next.Bundle} {
				if !verifies(t, now, cert, b, p.Hosts) {
					t.Fatalf("at %s: a served certificate is not trusted by a published bundle (window in admission)", now.Sub(start))
				}
			}
		}
		if string(next.CACert) != string(cur.CACert) {
			caRotations++
		}
		if string(next.Cert) != string(cur.Cert) {
			certRotations++
		}
		maxCAs = max(maxCAs, countCAs(next.Bundle))
		again, err := Plan(now, next, p)
		if err != nil || !again.Equal(next) {
			t.Fatalf("at %s: Plan is not idempotent", now.Sub(start))
		}
		cur = next
	}
	if caRotations < 3 || certRotations < 10 || maxCAs < 2 {
		t.Fatalf("CA rotations %d, certificate rotations %d, max CAs in bundle %d: the timeline did not exercise rotation",
			caRotations, certRotations, maxCAs)
	}
	if n := countCAs(cur.Bundle); n > 2 {
		t.Fatalf("expired CAs are not pruned: %d in the bundle", n)
	}
}

// TestPlanWaitsForPublishing checks the serving certificate does not switch to a new CA
// that has not been published, however long it waits.
func TestPlanWaitsForPublishing(t *testing.T) {
	p := testPolicy()
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s, err := Plan(start, State{}, p)
	if err != nil {
		t.Fatal(err)
	}
	at := start.Add(p.CAValidity - p.CARenewBefore)
	s, err = Plan(at, s, p)
	if err != nil || len(s.NextCACert) == 0 {
		t.Fatalf("no pending CA at renewal time: %v", err)
	}
	pending := s.NextCACert
	for later := at; later.Before(at.Add(2 * time.Hour)); later = later.Add(10 * time.Minute) {
		if s, err = Plan(later, s, p); err != nil {
			t.Fatal(err)
		}
		if string(s.CACert) == string(pending) || verifies(t, later, s.Cert, pending, p.Hosts) {
			t.Fatal("switched to an unpublished CA")
		}
	}
	s.NextPublishedAt = at.Add(2 * time.Hour)
	if s, _ = Plan(s.NextPublishedAt.Add(p.PropagationDelay-time.Second), s, p); string(s.CACert) == string(pending) {
		t.Fatal("switched before the propagation delay")
	}
	if s, _ = Plan(s.NextPublishedAt.Add(p.PropagationDelay), s, p); string(s.CACert) != string(pending) || !verifies(t, at.Add(3*time.Hour), s.Cert, pending, p.Hosts) {
		t.Fatal("did not switch after the propagation delay")
	}
}

func TestPolicyValidate(t *testing.T) {
	bad := testPolicy()
	bad.CARenewBefore = bad.PropagationDelay
	if bad.Validate() == nil {
		t.Fatal("a renew-before no longer than the propagation delay must be rejected")
	}
	if err := DefaultPolicy([]string{"x"}).Validate(); err != nil {
		t.Fatal(err)
	}
}
