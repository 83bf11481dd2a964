package peertls

import (
	"crypto/tls"
	"crypto/x509"
	"errors"

	"github.com/podipc/podipc/pkg/identity"
)

// Workload is the Source of a sidecar in Kubernetes mode: the workload certificate and
// trust bundle the identity client obtains from the controller and renews. Client is set
// before the first handshake (the sidecar sets it before it starts); until the client
// holds its first certificate, handshakes fail and links are retried, as for a peer that
// is not up yet.
type Workload struct {
	Client *identity.Client
}

var _ Source = (*Workload)(nil)

// Certificate implements Source.
func (w *Workload) Certificate() (*tls.Certificate, error) {
	if w.Client == nil {
		return nil, errors.New("no identity client")
	}
	c := w.Client.Certificate()
	if c == nil {
		return nil, errors.New("no workload certificate from the identity endpoint yet")
	}
	return c, nil
}

// Roots implements Source.
func (w *Workload) Roots() *x509.CertPool {
	if w.Client == nil {
		return nil
	}
	return w.Client.Roots()
}
