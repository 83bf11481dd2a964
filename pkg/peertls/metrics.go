package peertls

import (
	"crypto/x509"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the series of peer-link security. Inbound refusals are counted by
// pkg/peer in podipc_peer_refused_total under the Reason* labels.
type Metrics struct {
	// Plaintext counts plaintext links admitted under Permissive, by direction.
	Plaintext *prometheus.CounterVec
	// OutboundRefused counts dialled links abandoned because the receiver's
	// certificate failed verification, by reason.
	OutboundRefused *prometheus.CounterVec
}

// NewMetrics creates the series and registers them with reg (if not nil), with the
// expiry of src's current certificate (if src is not nil).
func NewMetrics(reg prometheus.Registerer, src Source) *Metrics {
	m := &Metrics{
		Plaintext: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "podipc_peer_plaintext_links_total",
			Help: "Plaintext peer links admitted under --peer-tls=Permissive, by direction (in: accepted, out: dialled).",
		}, []string{"direction"}),
		OutboundRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "podipc_peer_outbound_refused_total",
			Help: "Dialled peer links abandoned because the receiver's certificate failed verification, by reason.",
		}, []string{"reason"}),
	}
	if reg == nil {
		return m
	}
	reg.MustRegister(m.Plaintext, m.OutboundRefused)
	if src != nil {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "podipc_peer_certificate_expiry_timestamp_seconds",
			Help: "When the sidecar's current peer certificate expires (Unix time).",
		}, func() float64 { return expiry(src) }))
	}
	return m
}

// expiry returns the Unix time src's certificate expires, or 0 if there is none.
func expiry(src Source) float64 {
	c, err := src.Certificate()
	if err != nil || c == nil || len(c.Certificate) == 0 {
		return 0
	}
	leaf := c.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(c.Certificate[0]); err != nil {
			return 0
		}
	}
	return float64(leaf.NotAfter.Unix())
}
