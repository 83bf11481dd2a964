// Package identity is podipc's workload identity as a sidecar holds it: an X.509
// certificate issued by the controller (see package issuer) for a key generated in memory,
// the trust bundle to check peers with, and the check itself.
//
// # What a certificate says
//
// A workload certificate has exactly one URI SAN, the SPIFFE ID of the pod's service
// account, spiffe://<trust domain>/ns/<namespace>/sa/<service account>, so SPIFFE-aware
// tools accept it as an X509-SVID (which allows one URI SAN only). The pod itself is named
// by the subject's common name, which is the pod UID: a UID is 36 characters, names one
// pod for ever, and is what an EndpointSlice endpoint's targetRef carries, so a peer checks
// a certificate against a member exactly as discovery reports it (see Verify). The
// namespace is in the SPIFFE ID, so (namespace, UID) is checked; the pod name follows from
// the UID, which the issuer bound to the name through the TokenReview.
//
// # How a sidecar gets one
//
// [Client] generates an ECDSA P-256 key when it starts; the key lives in the process only
// and is never written anywhere. It posts a certificate signing request with the pod's
// projected service-account token (audience [Audience]) to the controller's identity
// endpoint over HTTPS, verifying the endpoint against the trust bundle, and renews at
// half the certificate's life with jitter. The bundle comes from a [BundleSource] (in
// Kubernetes the ConfigMap the controller publishes, read through the API server), so a
// new root is trusted by every sidecar before any certificate from it exists.
//
// This package keeps out k8s.io/api: it is linked into the sidecar, whose memory budget
// forbids the typed API packages (cmd/podipc-sidecar/deps_test.go).
package identity

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"
)

// Audience is the audience of the projected service-account token a sidecar presents to
// the identity endpoint. A token for any other audience (the API server's own, say) is
// refused, so a token stolen from elsewhere cannot buy a certificate, and this one cannot
// be replayed against the API server.
const Audience = "podipc.dev/identity"

// CertificatePath is where the identity endpoint takes certificate requests.
const CertificatePath = "/v1/certificate"

// DefaultTrustDomain is the trust domain of SPIFFE IDs unless the chart says otherwise.
const DefaultTrustDomain = "cluster.local"

// Pod names the pod a certificate is for.
type Pod struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	UID       string `json:"uid"`
}

// SPIFFEID returns spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>.
func SPIFFEID(trustDomain, namespace, serviceAccount string) *url.URL {
	return &url.URL{Scheme: "spiffe", Host: trustDomain, Path: "/ns/" + namespace + "/sa/" + serviceAccount}
}

// Stamp writes the identity of a workload certificate for the pod of UID uid, running as
// serviceAccount in namespace, into tmpl: the SPIFFE ID as its one URI SAN and the UID as
// its subject's common name. With ParsePeer it is the one place that knows the format;
// the issuer, the test and demo certificate makers and the peer-link check all go
// through the two.
func Stamp(tmpl *x509.Certificate, trustDomain, namespace, serviceAccount, uid string) {
	tmpl.URIs = []*url.URL{SPIFFEID(trustDomain, namespace, serviceAccount)}
	tmpl.Subject.CommonName = uid
}

// Peer is what a verified workload certificate says.
type Peer struct {
	// SPIFFEID is the certificate's URI SAN.
	SPIFFEID string
	// TrustDomain, Namespace and ServiceAccount are parsed from the SPIFFE ID.
	TrustDomain, Namespace, ServiceAccount string
	// UID is the pod UID (the subject's common name).
	UID string
	// NotAfter is when the certificate expires.
	NotAfter time.Time
}

// ParsePeer reads the identity out of a workload certificate of trustDomain, without
// checking its chain (Verify does both). An empty trustDomain accepts any (static
// discovery, with certificates from files, knows none).
func ParsePeer(cert *x509.Certificate, trustDomain string) (Peer, error) {
	if len(cert.URIs) != 1 {
		return Peer{}, fmt.Errorf("identity: the certificate has %d URI SANs, want exactly one SPIFFE ID", len(cert.URIs))
	}
	u := cert.URIs[0]
	if u.Scheme != "spiffe" || u.Host == "" || (trustDomain != "" && u.Host != trustDomain) {
		return Peer{}, fmt.Errorf("identity: %s is not a SPIFFE ID of trust domain %q", u, trustDomain)
	}
	parts := strings.Split(strings.TrimPrefix(u.Path, "/"), "/")
	if len(parts) != 4 || parts[0] != "ns" || parts[2] != "sa" || parts[1] == "" || parts[3] == "" {
		return Peer{}, fmt.Errorf("identity: %s is not of the form spiffe://<trust domain>/ns/<namespace>/sa/<service account>", u)
	}
	if cert.Subject.CommonName == "" {
		return Peer{}, errors.New("identity: the certificate names no pod UID (empty common name)")
	}
	return Peer{SPIFFEID: u.String(), TrustDomain: u.Host, Namespace: parts[1], ServiceAccount: parts[3], UID: cert.Subject.CommonName, NotAfter: cert.NotAfter}, nil
}

// Verify checks a peer's certificate chain (leaf first, as a TLS handshake delivers it)
// against roots at now, for client and server use alike, and checks that it names want:
// the same namespace and pod UID. want is a member as discovery reports it (the
// EndpointSlice endpoint's targetRef); a valid certificate of any other pod is refused.
func Verify(rawCerts [][]byte, roots *x509.CertPool, trustDomain string, want Pod, now time.Time) (Peer, error) {
	if len(rawCerts) == 0 {
		return Peer{}, errors.New("identity: the peer presented no certificate")
	}
	if roots == nil {
		return Peer{}, errors.New("identity: no trust bundle yet")
	}
	certs := make([]*x509.Certificate, 0, len(rawCerts))
	for _, raw := range rawCerts {
		c, err := x509.ParseCertificate(raw)
		if err != nil {
			return Peer{}, fmt.Errorf("identity: the peer's certificate cannot be parsed: %w", err)
		}
		certs = append(certs, c)
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := certs[0].Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
	}); err != nil {
		return Peer{}, fmt.Errorf("identity: the peer's certificate does not chain to the trust bundle: %w", err)
	}
	p, err := ParsePeer(certs[0], trustDomain)
	if err != nil {
		return Peer{}, err
	}
	if p.Namespace != want.Namespace || p.UID != want.UID {
		return p, fmt.Errorf("identity: the certificate is for pod UID %s in namespace %s, not member %s/%s (UID %s)",
			p.UID, p.Namespace, want.Namespace, want.Name, want.UID)
	}
	return p, nil
}
