package issuer

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the identity endpoint's metrics.
type Metrics struct {
	// Requests counts certificate requests by result: issued, or the refusal's reason.
	Requests *prometheus.CounterVec
}

// NewMetrics registers the metrics on reg (the controller's: controller-runtime's
// metrics.Registry).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{Requests: prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "podipc_identity_requests_total",
		Help: "Workload certificate requests to the identity endpoint, by result: issued, or the reason of the refusal.",
	}, []string{"result"})}
	reg.MustRegister(m.Requests)
	return m
}
