package inject

import (
	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
)

// The webhook's metrics, served by the manager's metrics endpoint.
var (
	skips = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "podipc_webhook_skips_total",
		Help: "Pods that asked for the podipc sidecar but were admitted without it, by reason.",
	}, []string{"reason"})
	injections = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "podipc_webhook_injections_total",
		Help: "Pods the webhook injected with the podipc sidecar.",
	})
	rejections = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "podipc_webhook_rejections_total",
		Help: "Pods the webhook denied (invalid podipc annotations or labels, clashing channel ports).",
	})
)

func init() {
	for _, r := range SkipReasons {
		skips.WithLabelValues(string(r)) // export every reason from the start, at zero
	}
	metrics.Registry.MustRegister(skips, injections, rejections)
}
