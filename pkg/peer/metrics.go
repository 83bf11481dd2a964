package peer

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the peer links' Prometheus series.
type Metrics struct {
	Links      *prometheus.GaugeVec
	Reconnects prometheus.Counter
	Refused    *prometheus.CounterVec
	Sent       prometheus.Counter
	Received   prometheus.Counter
	Unacked    prometheus.Gauge
	// Senders counts the sending pods whose resume state the server keeps; it grows
	// with pod churn only until departed pods leave the membership.
	Senders prometheus.Gauge
}

// NewMetrics creates the peer series and registers them with reg (if not nil).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Links: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "podipc_peer_links", Help: "Peer links by direction (out: dialled, in: accepted) and state.",
		}, []string{"direction", "state"}),
		Reconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "podipc_peer_reconnects_total", Help: "Outbound peer link sessions that ended and were redialled.",
		}),
		Refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "podipc_peer_refused_total", Help: "Inbound peer links refused, by reason.",
		}, []string{"reason"}),
		Sent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "podipc_peer_lines_sent_total", Help: "DATA frames written to peer links (retransmissions included).",
		}),
		Received: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "podipc_peer_lines_received_total", Help: "Lines received from peer links and delivered (duplicates excluded).",
		}),
		Unacked: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "podipc_peer_unacked_bytes", Help: "Bytes queued on outbound peer links and not yet acknowledged.",
		}),
		Senders: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "podipc_peer_senders", Help: "Sending pods whose resume state (incarnation, last sequence number) inbound peer links keep: connected ones and members briefly disconnected.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.Links, m.Reconnects, m.Refused, m.Sent, m.Received, m.Unacked, m.Senders)
	}
	return m
}
