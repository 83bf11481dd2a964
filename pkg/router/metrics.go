package router

import (
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// OtherChannel is the channel label of lines counted for a channel this sidecar does
// not serve: a channel name is a label value only once the sidecar serves it, so the
// series stay bounded by the channels served whatever names peers send. It is not a
// DNS label, so no channel can be named so.
const OtherChannel = "_other"

// Metrics are the router's Prometheus series, all prefixed podipc_.
type Metrics struct {
	LinesIn     *prometheus.CounterVec
	LinesOut    *prometheus.CounterVec
	Dropped     *prometheus.CounterVec
	QueueBytes  *prometheus.GaugeVec
	Connections *prometheus.GaugeVec
}

// NewMetrics creates the router's series and registers them with reg (if not nil).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		LinesIn: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "podipc_lines_in_total", Help: "Lines accepted from local app connections.",
		}, []string{"channel"}),
		LinesOut: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "podipc_lines_out_total", Help: "Lines written to local app connections.",
		}, []string{"channel"}),
		Dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "podipc_dropped_lines_total", Help: "Lines not delivered to a receiver, by reason.",
		}, []string{"channel", "reason"}),
		QueueBytes: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "podipc_queue_bytes", Help: "Bytes queued for local app connections.",
		}, []string{"channel"}),
		Connections: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "podipc_local_connections", Help: "Open local app connections.",
		}, []string{"channel"}),
	}
	if reg != nil {
		reg.MustRegister(m.LinesIn, m.LinesOut, m.Dropped, m.QueueBytes, m.Connections)
	}
	return m
}

// DroppedTotals returns podipc_dropped_lines_total as "channel/reason" → lines, for the
// sidecar's last log line: what a sidecar counted after its last scrape would otherwise
// leave with the process (docs/reliability.md reads it there).
func (m *Metrics) DroppedTotals() map[string]float64 {
	out := map[string]float64{}
	ch := make(chan prometheus.Metric)
	go func() {
		m.Dropped.Collect(ch)
		close(ch)
	}()
	for s := range ch {
		var pb dto.Metric
		if s.Write(&pb) != nil || pb.GetCounter().GetValue() == 0 {
			continue
		}
		var channel, reason string
		for _, l := range pb.GetLabel() {
			switch l.GetName() {
			case "channel":
				channel = l.GetValue()
			case "reason":
				reason = l.GetValue()
			}
		}
		out[channel+"/"+reason] = pb.GetCounter().GetValue()
	}
	return out
}

// DroppedTotals is the router's Metrics.DroppedTotals.
func (r *Router) DroppedTotals() map[string]float64 { return r.metrics.DroppedTotals() }
