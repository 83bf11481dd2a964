// Package pki issues throwaway peer certificates, in podipc's one identity format
// (written by identity.Stamp, as the controller's issuer writes it), for tests and the
// demo: a root in memory and leaf certificates for pods.
// It is not a certificate authority for clusters (the controller's identity endpoint
// is).
package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"time"

	"github.com/podipc/podipc/pkg/identity"
	"github.com/podipc/podipc/pkg/peertls"
)

// CA is a root certificate and its key.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
	// PEM is the root certificate, PEM-encoded (a trust bundle of one).
	PEM []byte
}

// NewCA returns a self-signed ECDSA P-256 root named name, valid from now for a day.
func NewCA(name string) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: name},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// Issue returns a leaf certificate for pod, valid from notBefore to notAfter, for both
// ends of a peer link (client and server authentication), and its key, PEM-encoded. A
// pod without a trust domain or service account gets identity.DefaultTrustDomain and
// "default", as the issuer would.
func (ca *CA) Issue(pod peertls.Pod, notBefore, notAfter time.Time) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		NotBefore:    notBefore, NotAfter: notAfter,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
	}
	td, sa := pod.TrustDomain, pod.ServiceAccount
	if td == "" {
		td = identity.DefaultTrustDomain
	}
	if sa == "" {
		sa = "default"
	}
	identity.Stamp(tmpl, td, pod.Namespace, sa, pod.UID)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return nil, nil, err
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), nil
}

// Files are the paths of one pod's --tls-cert, --tls-key and --tls-ca.
type Files struct{ Cert, Key, CA string }

// Args returns the sidecar flags naming the files.
func (f Files) Args() []string {
	return []string{"--tls-cert=" + f.Cert, "--tls-key=" + f.Key, "--tls-ca=" + f.CA}
}

// WriteFiles writes a certificate for pod, valid for a day, with its key and bundle
// into dir as cert.pem, key.pem and ca.pem.
func (ca *CA) WriteFiles(dir string, pod peertls.Pod, bundle []byte) (Files, error) {
	now := time.Now()
	certPEM, keyPEM, err := ca.Issue(pod, now.Add(-time.Minute), now.Add(24*time.Hour))
	if err != nil {
		return Files{}, err
	}
	f := Files{Cert: filepath.Join(dir, "cert.pem"), Key: filepath.Join(dir, "key.pem"), CA: filepath.Join(dir, "ca.pem")}
	return f, f.Write(certPEM, keyPEM, bundle)
}

// Write replaces the files' contents, each by a rename, the key before the
// certificate: a reader sees a mismatched pair at most until the certificate lands.
func (f Files) Write(certPEM, keyPEM, bundle []byte) error {
	for _, w := range []struct {
		path string
		data []byte
	}{{f.CA, bundle}, {f.Key, keyPEM}, {f.Cert, certPEM}} {
		if w.data == nil {
			continue
		}
		if err := os.WriteFile(w.path+".tmp", w.data, 0o600); err != nil {
			return err
		}
		if err := os.Rename(w.path+".tmp", w.path); err != nil {
			return err
		}
	}
	return nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}
