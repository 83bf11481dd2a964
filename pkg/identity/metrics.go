package identity

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the sidecar's identity metrics.
type Metrics struct {
	// Expiry is the Unix time the current certificate expires; 0 before the first.
	Expiry prometheus.Gauge
	// Requests counts the sidecar's certificate requests by result (a Result* value, or
	// "error" when no answer came).
	Requests *prometheus.CounterVec
}

// NewMetrics registers the identity metrics on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Expiry: prometheus.NewGauge(prometheus.GaugeOpts{Name: "podipc_identity_certificate_expiry_timestamp_seconds",
			Help: "Unix time at which the sidecar's workload certificate expires; 0 before the first is issued."}),
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "podipc_identity_client_requests_total",
			Help: "The sidecar's workload certificate requests, by result (issued, a refusal reason, or error)."}, []string{"result"}),
	}
	reg.MustRegister(m.Expiry, m.Requests)
	return m
}
