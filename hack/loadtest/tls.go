package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// plainArgs runs the podipc target's peer links in plaintext.
func plainArgs(string, string, string) ([]string, error) {
	return []string{"--peer-tls=Disabled"}, nil
}

// benchCA is the throwaway root of the podipc-mtls target, made on first use.
var benchCA struct {
	once sync.Once
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
	err  error
}

// mtlsArgs writes a certificate for the pod (namespace bench), in podipc's identity
// format, and returns the flags that require mutual TLS with it. The tool imports
// nothing from podipc (its own module), hence this copy of the format: pkg/identity
// (Stamp, ParsePeer) is its source of truth — one SPIFFE ID
// spiffe://<trustDomain>/ns/<ns>/sa/<sa> as the only URI SAN, the pod UID as the
// subject's common name.
func mtlsArgs(dir, pod, uid string) ([]string, error) {
	benchCA.once.Do(func() { benchCA.cert, benchCA.key, benchCA.pem, benchCA.err = newBenchCA() })
	if benchCA.err != nil {
		return nil, benchCA.err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(now.UnixNano()), Subject: pkix.Name{CommonName: uid},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(24 * time.Hour),
		URIs:        []*url.URL{{Scheme: "spiffe", Host: "cluster.local", Path: "/ns/bench/sa/default"}},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, benchCA.cert, &key.PublicKey, benchCA.key)
	if err != nil {
		return nil, err
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	files := map[string][]byte{
		"cert": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		"key":  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}),
		"ca":   benchCA.pem,
	}
	args := []string{"--peer-tls=Required"}
	for _, what := range []string{"cert", "key", "ca"} {
		path := filepath.Join(dir, pod+"-"+what+".pem")
		if err := os.WriteFile(path, files[what], 0o600); err != nil {
			return nil, err
		}
		args = append(args, "--tls-"+what+"="+path)
	}
	return args, nil
}

// newBenchCA returns a self-signed ECDSA P-256 root.
func newBenchCA() (*x509.Certificate, *ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "podipc loadtest root"},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, nil, err
	}
	return cert, key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}
