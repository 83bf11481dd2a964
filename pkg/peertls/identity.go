package peertls

import (
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/podipc/podipc/pkg/identity"
)

// Pod is the workload a peer certificate must name: a member as discovery reports it
// (an EndpointSlice's targetRef: namespace, name, UID), with the trust domain and
// service account where they are known. The certificate format is pkg/identity's, the
// one podipc has (an X509-SVID: one SPIFFE URI SAN spiffe://<trustDomain>/ns/<ns>/sa/<sa>,
// the pod UID as the subject's common name); identity.Stamp writes it and
// identity.ParsePeer reads it, and this package knows no more of it.
type Pod struct {
	TrustDomain    string
	Namespace      string
	ServiceAccount string
	// Name is for logs only: the certificate names the pod by UID, which the issuer
	// bound to the name.
	Name string
	UID  string
}

// String names the pod for logs.
func (p Pod) String() string { return p.Namespace + "/" + p.Name + " (UID " + p.UID + ")" }

// ErrServiceAccount marks a certificate of the right pod (namespace and UID) that names
// another service account than the one the controller publishes for that member.
var ErrServiceAccount = errors.New("service account mismatch")

// reasonOfVerify is the refusal reason of a failed Verify.
func reasonOfVerify(err error) string {
	if errors.Is(err, ErrServiceAccount) {
		return ReasonServiceAccount
	}
	return ReasonIdentity
}

// Verify checks that cert names the pod want: its namespace and UID must be want's,
// and, for each of want's trust domain and service account that is set, its SPIFFE ID
// must carry that one too. Static discovery knows neither, so an empty one is not
// compared. It returns why not, or nil. The chain is checked elsewhere (verifyChain).
func Verify(cert *x509.Certificate, want Pod) error {
	got, err := identity.ParsePeer(cert, want.TrustDomain)
	if err != nil {
		return err
	}
	switch {
	case got.Namespace != want.Namespace || got.UID != want.UID:
		return fmt.Errorf("certificate names pod UID %s in namespace %s, expected %s", got.UID, got.Namespace, want)
	case want.ServiceAccount != "" && got.ServiceAccount != want.ServiceAccount:
		return fmt.Errorf("%w: certificate names service account %q, but the controller publishes member %s as running as %q",
			ErrServiceAccount, got.ServiceAccount, want, want.ServiceAccount)
	}
	return nil
}
