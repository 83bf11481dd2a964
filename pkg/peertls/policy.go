// Package peertls is the transport security of peer links (docs/security.md): TLS 1.3
// with both sides presenting certificates from a Source, each verifying the other's
// chain against the Source's current trust bundle and that the certificate names the
// pod discovery reports. It implements peer.Secure.
package peertls

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"time"

	"github.com/go-logr/logr"

	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/peer"
)

// Source supplies this sidecar's certificate and the trust bundle. Both are read for
// every handshake, so a renewed certificate or a rotated bundle is in force for the
// next link at once, and links already up are left alone. A file source (Files) and the
// identity client (through Workload) implement it.
type Source interface {
	// Certificate returns the current certificate chain and key.
	Certificate() (*tls.Certificate, error)
	// Roots returns the current trust bundle.
	Roots() *x509.CertPool
}

// Mode says which peer links are accepted and dialled.
type Mode string

const (
	// Required means every link is mutual TLS; plaintext peers are refused.
	Required Mode = "Required"
	// Permissive means links are mutual TLS where the peer speaks it; plaintext peers (older
	// releases, while a cluster upgrades) are accepted and counted, and a receiver that
	// does not speak TLS is dialled in plaintext.
	Permissive Mode = "Permissive"
	// Disabled means every link is plaintext, as before mutual TLS.
	Disabled Mode = "Disabled"
)

// ParseMode parses a --peer-tls value.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case Required, Permissive, Disabled:
		return m, nil
	}
	return "", fmt.Errorf("%q: want Required, Permissive or Disabled", s)
}

// HandshakeTimeout bounds a TLS handshake.
const HandshakeTimeout = 10 * time.Second

// Reasons under which links are refused (podipc_peer_refused_total, inbound) or
// abandoned (podipc_peer_outbound_refused_total).
const (
	ReasonPlaintext     = "plaintext"      // a plaintext peer while TLS is Required
	ReasonNoCertificate = "no_certificate" // the peer presented no certificate
	ReasonExpired       = "expired"        // its certificate is expired or not yet valid
	ReasonUntrusted     = "untrusted"      // its certificate does not chain to the bundle
	ReasonIdentity      = "identity"       // its certificate names another pod
	// ReasonServiceAccount: its certificate names the member's pod but another service
	// account than the controller publishes for it.
	ReasonServiceAccount = "service_account"
	ReasonHandshake      = "tls_handshake" // the TLS handshake failed otherwise
)

// recordHandshake is the first byte of every TLS connection (a handshake record). A
// plaintext link starts with a frame's uint32 length, whose first byte is 0 or 1.
const recordHandshake = 0x16

// Policy secures peer links in one Mode with certificates from one Source.
type Policy struct {
	Mode   Mode
	Source Source
	// TrustDomain, if set, is the trust domain a peer's SPIFFE ID must be of (Kubernetes
	// mode knows it; static mode accepts any from a certificate chaining to its bundle).
	TrustDomain string
	Log         logr.Logger
	Metrics     *Metrics
	// ServiceAccountOf returns the service account discovery publishes for the member
	// pod uid ("" if unknown: then it is not compared). A sender's certificate must name
	// it; a receiver's is checked against discovery.Member.ServiceAccount. Nil: never
	// compared.
	ServiceAccountOf func(uid string) string
}

var _ peer.Secure = (*Policy)(nil)

// Accept implements peer.Secure: it reads the first byte to tell TLS from plaintext,
// runs the TLS handshake under HandshakeTimeout, and returns a check that the identity
// HELLO claims is the certificate's.
func (p *Policy) Accept(conn net.Conn) (net.Conn, func(peer.Identity) error, error) {
	if p.Mode == Disabled {
		return conn, nil, nil
	}
	var first [1]byte
	if _, err := io.ReadFull(conn, first[:]); err != nil {
		return nil, nil, err
	}
	pc := &prefixConn{Conn: conn, first: first[0], pending: true}
	if first[0] != recordHandshake {
		if p.Mode == Required {
			return nil, nil, &peer.Refusal{Reason: ReasonPlaintext, Tell: true,
				Err: errors.New("this sidecar requires mutual TLS on peer links (--peer-tls=Required); a plaintext peer is refused")}
		}
		p.Metrics.Plaintext.WithLabelValues("in").Inc()
		p.Log.Info("Accepting a plaintext peer link (--peer-tls=Permissive)", "remote", conn.RemoteAddr().String())
		return pc, nil, nil
	}
	raw := newBatchConn(pc)
	tc := tls.Server(raw, p.serverConfig())
	ctx, cancel := context.WithTimeout(context.Background(), HandshakeTimeout)
	defer cancel()
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, nil, &peer.Refusal{Reason: reasonOf(err), Err: err}
	}
	cs := tc.ConnectionState()
	leaf := cs.PeerCertificates[0]
	p.Log.V(1).Info("TLS peer link accepted", "remote", conn.RemoteAddr().String(),
		"cipher", tls.CipherSuiteName(cs.CipherSuite), "curve", cs.CurveID.String())
	check := func(id peer.Identity) error {
		want := Pod{TrustDomain: p.TrustDomain, Namespace: id.Namespace, Name: id.Name, UID: id.UID}
		if p.ServiceAccountOf != nil {
			want.ServiceAccount = p.ServiceAccountOf(id.UID)
		}
		if err := Verify(leaf, want); err != nil {
			return &peer.Refusal{Reason: reasonOfVerify(err), Tell: true,
				Err: fmt.Errorf("HELLO claims pod %s/%s (UID %s): %w", id.Namespace, id.Name, id.UID, err)}
		}
		return nil
	}
	return newSession(tc, raw), check, nil
}

// Dial implements peer.Secure: it dials, runs the TLS handshake under
// HandshakeTimeout and verifies that the receiver's certificate names member. Under
// Permissive a receiver that closes the connection on a TLS hello (an older release)
// is dialled again in plaintext; one that speaks TLS but fails verification is not.
func (p *Policy) Dial(ctx context.Context, dial func(context.Context) (net.Conn, error), member discovery.Member) (net.Conn, error) {
	conn, err := dial(ctx)
	if err != nil || p.Mode == Disabled {
		return conn, err
	}
	raw := newBatchConn(conn)
	tc := tls.Client(raw, p.clientConfig(member))
	hctx, cancel := context.WithTimeout(ctx, HandshakeTimeout)
	defer cancel()
	err = tc.HandshakeContext(hctx)
	if err == nil {
		return newSession(tc, raw), nil
	}
	_ = conn.Close()
	if p.Mode == Permissive && speaksNoTLS(err) && ctx.Err() == nil {
		if conn, err = dial(ctx); err == nil {
			p.Metrics.Plaintext.WithLabelValues("out").Inc()
			p.Log.Info("Peer does not speak TLS: dialled in plaintext (--peer-tls=Permissive)",
				"peer", member.Namespace+"/"+member.Name, "peerUID", member.UID)
		}
		return conn, err
	}
	var v *verifyError
	if errors.As(err, &v) {
		p.Metrics.OutboundRefused.WithLabelValues(v.reason).Inc()
		p.Log.Info("Refused peer: its certificate failed verification", "peer", member.Namespace+"/"+member.Name,
			"peerUID", member.UID, "reason", v.reason, "err", v.err.Error())
	}
	return nil, fmt.Errorf("TLS handshake with %s: %w", member.Namespace+"/"+member.Name, err)
}

// speaksNoTLS says err is what an older, plaintext-only receiver does to a TLS hello:
// it reads a frame length far over its bound and closes the connection.
func speaksNoTLS(err error) bool {
	var alert tls.AlertError
	var v *verifyError
	var rec tls.RecordHeaderError
	if errors.As(err, &alert) || errors.As(err, &v) {
		return false
	}
	return errors.As(err, &rec) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET)
}

// serverConfig is the receiver's side: a certificate is requested and verified by
// verifyChain (not by crypto/tls, so that the bundle is read per handshake and a
// refusal carries its reason).
func (p *Policy) serverConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return p.Source.Certificate() },
		ClientAuth:     tls.RequestClientCert,
		VerifyConnection: func(cs tls.ConnectionState) error {
			return verifyChain(cs.PeerCertificates, p.Source.Roots(), x509.ExtKeyUsageClientAuth)
		},
	}
}

// clientConfig is the sender's side: the receiver's chain is verified against the
// bundle and its certificate must name member. Host names play no part (hence
// InsecureSkipVerify, which only turns off crypto/tls's own check).
func (p *Policy) clientConfig(member discovery.Member) *tls.Config {
	want := Pod{TrustDomain: p.TrustDomain, Namespace: member.Namespace, Name: member.Name, UID: member.UID,
		ServiceAccount: member.ServiceAccount}
	return &tls.Config{
		MinVersion:           tls.VersionTLS13,
		InsecureSkipVerify:   true, //nolint:gosec // verified by VerifyConnection against the bundle and member
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return p.Source.Certificate() },
		VerifyConnection: func(cs tls.ConnectionState) error {
			if err := verifyChain(cs.PeerCertificates, p.Source.Roots(), x509.ExtKeyUsageServerAuth); err != nil {
				return err
			}
			if err := Verify(cs.PeerCertificates[0], want); err != nil {
				return &verifyError{reason: reasonOfVerify(err), err: err}
			}
			return nil
		},
	}
}

// verifyError is a failed verification of a peer's certificate, with its reason.
type verifyError struct {
	reason string
	err    error
}

func (e *verifyError) Error() string { return e.err.Error() }

// verifyChain checks that certs (leaf first) chain to roots, are valid now and allow
// usage.
func verifyChain(certs []*x509.Certificate, roots *x509.CertPool, usage x509.ExtKeyUsage) error {
	if len(certs) == 0 {
		return &verifyError{reason: ReasonNoCertificate, err: errors.New("peer presented no certificate")}
	}
	if roots == nil {
		// x509 would fall back to the system's roots: a source without a bundle yet
		// trusts no one instead.
		return &verifyError{reason: ReasonUntrusted, err: errors.New("no trust bundle loaded")}
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	_, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}})
	if err == nil {
		return nil
	}
	reason := ReasonUntrusted
	var inv x509.CertificateInvalidError
	if errors.As(err, &inv) && inv.Reason == x509.Expired {
		reason = ReasonExpired
	}
	return &verifyError{reason: reason, err: err}
}

// reasonOf classifies a failed handshake.
func reasonOf(err error) string {
	var v *verifyError
	if errors.As(err, &v) {
		return v.reason
	}
	return ReasonHandshake
}

// prefixConn gives back the byte Accept read to tell TLS from plaintext.
type prefixConn struct {
	net.Conn
	first   byte
	pending bool
}

func (c *prefixConn) Read(b []byte) (int, error) {
	if c.pending && len(b) > 0 {
		c.pending = false
		b[0] = c.first
		return 1, nil
	}
	return c.Conn.Read(b)
}

// NetConn returns the TCP connection (peer links abort it for tests).
func (c *prefixConn) NetConn() net.Conn { return c.Conn }
