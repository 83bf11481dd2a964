// Package certs keeps the webhook's serving certificate valid without restarts and without a
// moment where the API server cannot verify it.
//
// In the default self-managed mode the leader ([Rotator]) keeps a CA and a serving certificate
// in a Secret and publishes the CA bundle into the MutatingWebhookConfiguration's caBundle,
// and every replica ([Keypair]) serves the Secret's current certificate through a
// tls.Config.GetCertificate hook. Rotation keeps one invariant: the API server trusts the CA of
// whatever certificate any replica serves. So a new CA is first added next to the old one in
// the Secret's bundle and published; only after PropagationDelay has passed since publishing
// does the serving certificate switch to one signed by the new CA; the old CA leaves the
// bundle only once it has expired. [Plan] is the pure state machine behind this, driven by an
// explicit clock in tests.
//
// open-policy-agent/cert-controller was evaluated and not used: its rotator replaces CA and
// serving certificate in one Secret write and then sets caBundle to the new CA alone, so old
// and new CA never overlap and admission fails while replicas and the API server catch up.
//
// With --cert-mode=cert-manager none of this runs: the controller serves from the mounted
// Secret directory and cert-manager's cainjector owns caBundle.
package certs

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"slices"
	"time"
)

// Policy is how long certificates live and when they are replaced.
type Policy struct {
	// Hosts are the DNS names and IP addresses the serving certificate covers.
	Hosts []string
	// CAValidity and CARenewBefore: a new CA is started CARenewBefore its predecessor expires.
	CAValidity, CARenewBefore time.Duration
	// CertValidity and CertRenewBefore: the serving certificate is reissued CertRenewBefore
	// it expires (and never outlives its CA).
	CertValidity, CertRenewBefore time.Duration
	// PropagationDelay is how long after the new CA was published in caBundle the serving
	// certificate may switch to it: time for the API server to load the webhook configuration
	// change and for every replica to see the Secret.
	PropagationDelay time.Duration
	// CAName is the common name of the CAs, before "@<unix time>"; empty means
	// "podipc-webhook-ca". It tells the webhook's CA from the workload identity root.
	CAName string
}

// DefaultPolicy returns the production lifetimes for hosts: a CA of 5 years replaced 1 year
// ahead, serving certificates of 90 days replaced 30 days ahead.
func DefaultPolicy(hosts []string) Policy {
	const day = 24 * time.Hour
	return Policy{
		Hosts:      hosts,
		CAValidity: 5 * 365 * day, CARenewBefore: 365 * day,
		CertValidity: 90 * day, CertRenewBefore: 30 * day,
		PropagationDelay: 2 * time.Minute,
	}
}

// Validate rejects policies under which the invariant cannot hold.
func (p Policy) Validate() error {
	switch {
	case len(p.Hosts) == 0:
		return errors.New("certs: no hosts for the serving certificate")
	case p.CARenewBefore <= p.PropagationDelay || p.CARenewBefore >= p.CAValidity:
		return fmt.Errorf("certs: CA renew-before %s must lie between the propagation delay %s and the CA validity %s",
			p.CARenewBefore, p.PropagationDelay, p.CAValidity)
	case p.CertRenewBefore >= p.CertValidity:
		return fmt.Errorf("certs: certificate renew-before %s must be below its validity %s", p.CertRenewBefore, p.CertValidity)
	}
	return nil
}

// State is what the Secret holds, PEM-encoded.
type State struct {
	// CACert and CAKey sign the serving certificate.
	CACert, CAKey []byte
	// NextCACert and NextCAKey are the CA being introduced, published but not yet signing.
	NextCACert, NextCAKey []byte
	// NextPublishedAt is when the bundle containing NextCACert reached caBundle; zero until then.
	NextPublishedAt time.Time
	// Cert and Key are the serving certificate every replica serves.
	Cert, Key []byte
	// Bundle is every CA the API server must trust, published as caBundle.
	Bundle []byte
}

// Plan returns the state that must follow cur at now. It is deterministic apart from fresh
// key material, and idempotent: planning its own result again changes nothing.
func Plan(now time.Time, cur State, p Policy) (State, error) {
	if err := p.Validate(); err != nil {
		return cur, err
	}
	next := cur
	ca, caErr := parsePair(cur.CACert, cur.CAKey)
	if caErr != nil || !now.Before(ca.cert.NotAfter) {
		// Bootstrap (or an unusable Secret): nothing valid is being served, so there is no
		// overlap to keep.
		fresh, err := newCA(now, p.CAValidity, p.caName())
		if err != nil {
			return cur, err
		}
		next = State{CACert: fresh.certPEM, CAKey: fresh.keyPEM, Bundle: fresh.certPEM}
		ca = fresh
	}
	if len(next.NextCACert) > 0 {
		pending, err := parsePair(next.NextCACert, next.NextCAKey)
		switch {
		case err != nil:
			next.NextCACert, next.NextCAKey, next.NextPublishedAt = nil, nil, time.Time{}
		case !next.NextPublishedAt.IsZero() && !now.Before(next.NextPublishedAt.Add(p.PropagationDelay)):
			// Promote: the new CA has been trusted for long enough.
			next.CACert, next.CAKey = next.NextCACert, next.NextCAKey
			next.NextCACert, next.NextCAKey, next.NextPublishedAt = nil, nil, time.Time{}
			next.Cert, next.Key = nil, nil
			ca = pending
		}
	} else if !now.Before(ca.cert.NotAfter.Add(-p.CARenewBefore)) {
		fresh, err := newCA(now, p.CAValidity, p.caName())
		if err != nil {
			return cur, err
		}
		next.NextCACert, next.NextCAKey, next.NextPublishedAt = fresh.certPEM, fresh.keyPEM, time.Time{}
	}
	if !servingValid(now, next.Cert, next.Key, ca, p) {
		cert, key, err := issue(now, ca, p)
		if err != nil {
			return cur, err
		}
		next.Cert, next.Key = cert, key
	}
	next.Bundle = bundle(now, next.Bundle, next.CACert, next.NextCACert)
	return next, nil
}

// Equal reports whether two states hold the same data.
func (s State) Equal(o State) bool {
	return bytes.Equal(s.CACert, o.CACert) && bytes.Equal(s.CAKey, o.CAKey) &&
		bytes.Equal(s.NextCACert, o.NextCACert) && bytes.Equal(s.NextCAKey, o.NextCAKey) &&
		s.NextPublishedAt.Equal(o.NextPublishedAt) && bytes.Equal(s.Cert, o.Cert) &&
		bytes.Equal(s.Key, o.Key) && bytes.Equal(s.Bundle, o.Bundle)
}

// NextAction is when Plan would next change s, so the Rotator can sleep until then.
func NextAction(s State, p Policy) time.Time {
	ca, err := parsePair(s.CACert, s.CAKey)
	if err != nil {
		return time.Time{}
	}
	at := ca.cert.NotAfter.Add(-p.CARenewBefore)
	if len(s.NextCACert) > 0 && !s.NextPublishedAt.IsZero() {
		at = s.NextPublishedAt.Add(p.PropagationDelay)
	}
	if c, err := parseCert(s.Cert); err == nil {
		at = earliest(at, c.NotAfter.Add(-p.CertRenewBefore))
	}
	return at
}

func earliest(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// bundle keeps the unexpired CAs of old plus active and pending, each once, in that order.
func bundle(now time.Time, old []byte, active, pending []byte) []byte {
	var out bytes.Buffer
	var seen [][]byte
	add := func(der []byte) {
		if slices.ContainsFunc(seen, func(s []byte) bool { return bytes.Equal(s, der) }) {
			return
		}
		seen = append(seen, der)
		_ = pem.Encode(&out, &pem.Block{Type: "CERTIFICATE", Bytes: der})
	}
	for rest := old; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		if c, err := x509.ParseCertificate(b.Bytes); err == nil && now.Before(c.NotAfter) {
			add(b.Bytes)
		}
	}
	for _, p := range [][]byte{active, pending} {
		if b, _ := pem.Decode(p); b != nil {
			add(b.Bytes)
		}
	}
	return out.Bytes()
}

// pair is a parsed certificate with its key.
type pair struct {
	cert            *x509.Certificate
	key             crypto.Signer
	certPEM, keyPEM []byte
}

func parseCert(certPEM []byte) (*x509.Certificate, error) {
	b, _ := pem.Decode(certPEM)
	if b == nil {
		return nil, errors.New("no PEM certificate")
	}
	return x509.ParseCertificate(b.Bytes)
}

func parsePair(certPEM, keyPEM []byte) (*pair, error) {
	c, err := parseCert(certPEM)
	if err != nil {
		return nil, err
	}
	b, _ := pem.Decode(keyPEM)
	if b == nil {
		return nil, errors.New("no PEM key")
	}
	k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
	if err != nil {
		return nil, err
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, errors.New("key cannot sign")
	}
	return &pair{cert: c, key: signer, certPEM: certPEM, keyPEM: keyPEM}, nil
}

// servingValid reports whether the serving pair is signed by ca, covers the hosts, and is
// not yet due for renewal.
func servingValid(now time.Time, certPEM, keyPEM []byte, ca *pair, p Policy) bool {
	sp, err := parsePair(certPEM, keyPEM)
	if err != nil || !now.Before(sp.cert.NotAfter.Add(-p.CertRenewBefore)) || sp.cert.CheckSignatureFrom(ca.cert) != nil {
		return false
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	for _, h := range p.Hosts {
		if _, err := sp.cert.Verify(x509.VerifyOptions{DNSName: h, Roots: pool, CurrentTime: now}); err != nil {
			return false
		}
	}
	return true
}

func newKey() (*ecdsa.PrivateKey, []byte, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, nil, err
	}
	return k, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func serial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}

// backdate tolerates clock skew between the controller and the API server.
const backdate = time.Hour

func (p Policy) caName() string {
	if p.CAName == "" {
		return "podipc-webhook-ca"
	}
	return p.CAName
}

func newCA(now time.Time, validity time.Duration, name string) (*pair, error) {
	k, keyPEM, err := newKey()
	if err != nil {
		return nil, err
	}
	sn, err := serial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          sn,
		Subject:               pkix.Name{CommonName: fmt.Sprintf("%s@%d", name, now.Unix())},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	if err != nil {
		return nil, err
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &pair{cert: c, key: k, certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM: keyPEM}, nil
}

func issue(now time.Time, ca *pair, p Policy) (certPEM, keyPEM []byte, err error) {
	k, keyPEM, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	sn, err := serial()
	if err != nil {
		return nil, nil, err
	}
	notAfter := now.Add(p.CertValidity)
	if ca.cert.NotAfter.Before(notAfter) {
		notAfter = ca.cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: sn,
		Subject:      pkix.Name{CommonName: p.Hosts[0]},
		NotBefore:    now.Add(-backdate),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range p.Hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, k.Public(), ca.key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM, nil
}
