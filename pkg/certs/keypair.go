package certs

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net/http"
	"sync/atomic"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	toolscache "k8s.io/client-go/tools/cache"
	ctrl "sigs.k8s.io/controller-runtime"
)

// Keypair serves the Secret's current serving certificate to TLS handshakes. Every replica
// runs one (it needs no leader): it watches that one Secret and swaps the certificate
// atomically, so a rotation never restarts the server or drops a connection.
type Keypair struct {
	// Clientset watches the Secret.
	Clientset kubernetes.Interface
	// Secret is the Secret the Rotator (or anything else) writes tls.crt and tls.key to.
	Secret types.NamespacedName

	current atomic.Pointer[tls.Certificate]
	// signer is the Secret's active CA with its key, and the bundle next to it.
	signer atomic.Pointer[Signer]
}

// Signer is the active CA of a Secret: what a certificate authority built on the Rotator
// (the workload identity issuer) signs with, and the bundle of every CA to trust.
type Signer struct {
	// Cert and Key are the active CA.
	Cert *x509.Certificate
	Key  crypto.Signer
	// Bundle is the PEM bundle of every CA currently trusted (active, pending, retiring).
	Bundle []byte
}

// Signer returns the Secret's active CA, or nil until the Secret has been read.
func (k *Keypair) Signer() *Signer { return k.signer.Load() }

// NeedLeaderElection lets every replica serve.
func (k *Keypair) NeedLeaderElection() bool { return false }

// GetCertificate is the tls.Config hook; it fails handshakes until the Secret has been read.
func (k *Keypair) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	if c := k.current.Load(); c != nil {
		return c, nil
	}
	return nil, errors.New("podipc: serving certificate not loaded yet")
}

// TLSOption installs GetCertificate on the webhook server's tls.Config.
func (k *Keypair) TLSOption(c *tls.Config) { c.GetCertificate = k.GetCertificate }

// Checker is a readiness check that passes once a certificate is loaded.
func (k *Keypair) Checker(*http.Request) error {
	if k.current.Load() == nil {
		return errors.New("serving certificate not loaded yet")
	}
	return nil
}

// Start watches the Secret (and only it, by a field selector) until ctx ends.
func (k *Keypair) Start(ctx context.Context) error {
	log := ctrl.LoggerFrom(ctx).WithName("cert-keypair")
	lw := toolscache.NewListWatchFromClient(k.Clientset.CoreV1().RESTClient(), "secrets", k.Secret.Namespace,
		fields.OneTermEqualSelector("metadata.name", k.Secret.Name))
	load := func(obj any) {
		s, ok := obj.(*corev1.Secret)
		if !ok || len(s.Data[keyCert]) == 0 {
			return
		}
		c, err := tls.X509KeyPair(s.Data[keyCert], s.Data[keyKey])
		if err != nil {
			log.Error(err, "Ignoring an unusable serving certificate", "secret", k.Secret)
			return
		}
		if ca, err := parsePair(s.Data[keyCACert], s.Data[keyCAKey]); err == nil {
			if old := k.signer.Load(); old == nil || !old.Cert.Equal(ca.cert) || string(old.Bundle) != string(s.Data[keyBundle]) {
				k.signer.Store(&Signer{Cert: ca.cert, Key: ca.key, Bundle: s.Data[keyBundle]})
			}
		}
		if old := k.current.Load(); old != nil && string(old.Certificate[0]) == string(c.Certificate[0]) {
			return
		}
		k.current.Store(&c)
		log.Info("Loaded the serving certificate", "secret", k.Secret, "notAfter", c.Leaf.NotAfter)
	}
	_, informer := toolscache.NewInformerWithOptions(toolscache.InformerOptions{
		ListerWatcher: lw,
		ObjectType:    &corev1.Secret{},
		Handler: toolscache.ResourceEventHandlerFuncs{
			AddFunc:    load,
			UpdateFunc: func(_, obj any) { load(obj) },
		},
	})
	informer.RunWithContext(ctx)
	return nil
}
