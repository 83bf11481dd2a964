package peertls_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"

	"github.com/podipc/podipc/internal/pki"
	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/peer"
	"github.com/podipc/podipc/pkg/peertls"
)

// fixed is a Source of one certificate and bundle.
type fixed struct {
	cert  *tls.Certificate
	roots *x509.CertPool
}

func (f fixed) Certificate() (*tls.Certificate, error) { return f.cert, nil }
func (f fixed) Roots() *x509.CertPool                  { return f.roots }

func source(t *testing.T, ca *pki.CA, pod peertls.Pod, roots *x509.CertPool) fixed {
	t.Helper()
	certPEM, keyPEM, err := ca.Issue(pod, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return fixed{cert: &cert, roots: roots}
}

// handshake runs receiver.Accept and sender.Dial against each other over loopback TCP
// and returns the receiver's result.
func handshake(t *testing.T, receiver, sender *peertls.Policy, member discovery.Member) (func(peer.Identity) error, error, error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	type result struct {
		check func(peer.Identity) error
		err   error
	}
	accepted := make(chan result, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			accepted <- result{err: err}
			return
		}
		defer func() { _ = conn.Close() }()
		_, check, err := receiver.Accept(conn)
		accepted <- result{check, err}
	}()
	conn, dialErr := sender.Dial(context.Background(), func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", ln.Addr().String())
	}, member)
	r := <-accepted
	if conn != nil {
		_ = conn.Close()
	}
	return r.check, r.err, dialErr
}

func policy(src peertls.Source) *peertls.Policy {
	return &peertls.Policy{Mode: peertls.Required, Source: src, Log: logr.Discard(), Metrics: peertls.NewMetrics(nil, nil)}
}

// TestHandshake: two pods of one root complete a handshake and the receiver's check
// accepts exactly the pod the sender's certificate names; a receiver without a trust
// bundle yet trusts no one (not the system's roots).
func TestHandshake(t *testing.T) {
	ca, err := pki.NewCA("root")
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	a := peertls.Pod{Namespace: "ns", Name: "a", UID: "ua"}
	b := peertls.Pod{Namespace: "ns", Name: "b", UID: "ub"}
	member := discovery.Member{Namespace: "ns", Name: "b", UID: "ub"}
	check, acceptErr, dialErr := handshake(t, policy(source(t, ca, b, roots)), policy(source(t, ca, a, roots)), member)
	if acceptErr != nil || dialErr != nil {
		t.Fatalf("handshake: accept %v, dial %v", acceptErr, dialErr)
	}
	if err := check(peer.Identity{Namespace: "ns", Name: "a", UID: "ua"}); err != nil {
		t.Fatalf("the sender's own identity was refused: %v", err)
	}
	if err := check(peer.Identity{Namespace: "ns", Name: "b", UID: "ub"}); err == nil {
		t.Fatal("a HELLO claiming another pod than the certificate was accepted")
	}

	_, acceptErr, _ = handshake(t, policy(source(t, ca, b, nil)), policy(source(t, ca, a, roots)), member)
	var r *peer.Refusal
	if !errors.As(acceptErr, &r) || r.Reason != peertls.ReasonUntrusted || !strings.Contains(r.Err.Error(), "no trust bundle") {
		t.Fatalf("a receiver without a bundle: %v, want an untrusted refusal", acceptErr)
	}
}
