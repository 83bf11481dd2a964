package peer

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the peer links' Prometheus series.
type Metrics struct {
	Links      *prometheus.GaugeVec
	Reconnects prometheus.Counter
	// Refused counts connections ended before their peer was authenticated, by reason.
	Refused *prometheus.CounterVec
	// ProtocolErrors counts established links ended because the peer broke the
	// protocol, by direction and reason (ProtocolError.Reason).
	ProtocolErrors *prometheus.CounterVec
	// Panics counts peer connection goroutines that panicked: the connection was
	// closed and the sidecar went on serving, but each one is a bug.
	Panics   *prometheus.CounterVec
	Sent     prometheus.Counter
	Received prometheus.Counter
	Unacked  prometheus.Gauge
	// Senders counts the sending pods whose resume state the server keeps; it grows
	// with pod churn only until departed pods leave the membership.
	Senders prometheus.Gauge
	// LinkUp, LinkChanged and LinkUnacked describe each outbound link by the receiving
	// pod's name. Links exist only to members of this pod's channels and a closed link's
	// series are deleted, so the label stays bounded by the channels' membership.
	LinkUp      *prometheus.GaugeVec
	LinkChanged *prometheus.GaugeVec
	LinkUnacked *prometheus.GaugeVec
	// links are the outbound links that report to Unacked and LinkUnacked: a link
	// that is down does not report per line, so a scrape brings each one up to date
	// first (unackedCollector).
	linksMu sync.Mutex
	links   map[*Link]struct{}
}

// track adds l to the links brought up to date at each scrape.
func (m *Metrics) track(l *Link) {
	m.linksMu.Lock()
	defer m.linksMu.Unlock()
	if m.links == nil {
		m.links = map[*Link]struct{}{}
	}
	m.links[l] = struct{}{}
}

// untrack removes l (closed) from them.
func (m *Metrics) untrack(l *Link) {
	m.linksMu.Lock()
	defer m.linksMu.Unlock()
	delete(m.links, l)
}

// refresh makes every link report its unacknowledged bytes.
func (m *Metrics) refresh() {
	m.linksMu.Lock()
	links := make([]*Link, 0, len(m.links))
	for l := range m.links {
		links = append(links, l)
	}
	m.linksMu.Unlock()
	for _, l := range links { // l.mu is never taken under linksMu
		l.reportUnacked()
	}
}

// unackedCollector exports Unacked and LinkUnacked exact at scrape time: it brings
// every link's report up to date before collecting them. A link that is up reports
// once per written batch and per acknowledgement; one that is down reports only
// here, so that queueing on it costs no gauge update per line.
type unackedCollector struct{ m *Metrics }

func (c unackedCollector) Describe(ch chan<- *prometheus.Desc) {
	c.m.Unacked.Describe(ch)
	c.m.LinkUnacked.Describe(ch)
}

func (c unackedCollector) Collect(ch chan<- prometheus.Metric) {
	c.m.refresh()
	c.m.Unacked.Collect(ch)
	c.m.LinkUnacked.Collect(ch)
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
			Name: "podipc_peer_refused_total", Help: "Inbound peer connections ended before authentication, by reason.",
		}, []string{"reason"}),
		ProtocolErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "podipc_peer_protocol_errors_total", Help: "Peer links ended because the peer broke the protocol, by direction and reason.",
		}, []string{"direction", "reason"}),
		Panics: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "podipc_peer_panics_total", Help: "Peer connection goroutines that panicked (a bug): the connection was closed, the sidecar kept serving.",
		}, []string{"direction"}),
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
		LinkUp: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "podipc_peer_link_up", Help: "1 while the outbound peer link to the member pod peer is established, 0 otherwise.",
		}, []string{"peer"}),
		LinkChanged: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "podipc_peer_link_last_change_timestamp_seconds", Help: "When the outbound peer link to peer last went up or down (or was created), in Unix seconds.",
		}, []string{"peer"}),
		LinkUnacked: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "podipc_peer_link_unacked_bytes", Help: "Bytes queued on the outbound peer link to peer and not yet acknowledged.",
		}, []string{"peer"}),
	}
	// Every reason is exported from the start, at zero, so that an alert on a rate
	// sees the first refusal, protocol error or panic.
	for _, r := range refusedReasons {
		m.Refused.WithLabelValues(r)
	}
	for _, dir := range []string{"in", "out"} {
		for _, r := range protocolReasons {
			m.ProtocolErrors.WithLabelValues(dir, r)
		}
		m.Panics.WithLabelValues(dir)
	}
	if reg != nil {
		reg.MustRegister(m.Links, m.Reconnects, m.Refused, m.ProtocolErrors, m.Panics, m.Sent, m.Received, m.Senders,
			m.LinkUp, m.LinkChanged, unackedCollector{m})
	}
	return m
}

// refusedReasons are the reason labels of podipc_peer_refused_total.
var refusedReasons = []string{RefusedHandshake, RefusedVersion, RefusedUnauthorized, RefusedConnectionLimit,
	RefusedSourceLimit, RefusedHandshakeTimeout, RefusedIdentity}

// protocolReasons are the reason labels of podipc_peer_protocol_errors_total.
var protocolReasons = []string{ReasonMalformed, ReasonChannelName, ReasonKind, ReasonFrameSize, ReasonSequence, ReasonRun,
	ReasonAck, ReasonLastSeq}
