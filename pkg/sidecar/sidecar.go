// Package sidecar wires the data plane of one pod: discovery feeds the router and the
// peer links, endpoints serve the apps, and an admin server reports health, readiness
// and metrics. Its Start runs until the context ends and then drains (docs/design.md
// §7.2).
package sidecar

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/podipc/podipc/internal/buffer"
	"github.com/podipc/podipc/internal/wake"
	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/endpoint"
	"github.com/podipc/podipc/pkg/identity"
	"github.com/podipc/podipc/pkg/ipc"
	"github.com/podipc/podipc/pkg/peer"
	"github.com/podipc/podipc/pkg/peertls"
	"github.com/podipc/podipc/pkg/router"
)

// Version is the sidecar's version, exported as podipc_build_info{version}.
var Version = "dev"

// Sidecar is one pod's data plane.
type Sidecar struct {
	cfg    Config
	log    logr.Logger
	source discovery.Source
	reg    *prometheus.Registry
	self   peer.Identity

	router   *router.Router
	pmetrics *peer.Metrics
	// members counts, per channel, the remote members this sidecar links to that
	// discovery reports ready and serving: what Broadcast and AnyOne deliver to.
	members *prometheus.GaugeVec
	// unbound is, per channel and endpoint (line, nodeipc), 1 while the endpoint could
	// not be bound and is being retried, and 0 once it is bound.
	unbound *prometheus.GaugeVec
	// appRefused counts, per channel and endpoint, app connections closed over the
	// --max-app-connections cap.
	appRefused *prometheus.CounterVec
	server     *peer.Server
	// secure is the peer links' TLS (nil: plaintext); files or workload feeds it
	// certificates.
	secure   peer.Secure
	files    *peertls.Files
	workload *peertls.Workload
	admin    *http.Server
	adminLn  net.Listener

	mu sync.Mutex
	// state is the last snapshot applied. Links and the peer server read it (through
	// sharedChannels and authorize) without s.mu, which apply holds while it closes
	// links that may be inside those callbacks.
	state   atomic.Pointer[discovery.State]
	served  map[string]*served
	links   map[string]*peer.Link
	linkCtx context.Context
	synced  atomic.Bool
	// readyOnce is set when /readyz first answers 200: from then on an unbound line
	// port is reported (log, metric) but no longer takes the whole pod out of service.
	readyOnce atomic.Bool
	draining  atomic.Bool
	// unboundLines counts the served channels whose line port is not bound; the pod
	// is not ready while it is above zero.
	unboundLines atomic.Int32
	// rebind wakes rebindLoop when an endpoint could not be bound.
	rebind chan struct{}
	// identity, if set, keeps the pod's workload certificate (see WithIdentity).
	identity *identity.Client
	wg       sync.WaitGroup
}

// WithIdentity makes Start run c, which obtains and renews the pod's workload
// certificate, and exports its metrics. Call it before Start. Under --peer-tls=Required
// or Permissive (without certificate files) peer links present that certificate and check
// peers against c's trust bundle; until the first certificate arrives their handshakes
// fail and are retried. Readiness does not wait for it.
func (s *Sidecar) WithIdentity(c *identity.Client) {
	c.Metrics = identity.NewMetrics(s.reg)
	s.identity = c
	if s.workload != nil {
		s.workload.Client = c
	}
}

// served is a channel with its two endpoints. An endpoint that is nil could not be
// bound (or is not wanted: no socket directory); its retry says when rebindLoop tries
// again.
type served struct {
	spec         discovery.Spec
	lines        *endpoint.Endpoint
	nodeipc      *endpoint.Endpoint
	linesRetry   retry
	nodeipcRetry retry
}

// Backoff of endpoint binds that failed (the port may be held for a while by a
// process of the pod that is still shutting down).
const (
	firstRebindWait   = 250 * time.Millisecond
	longestRebindWait = 10 * time.Second
)

// retry is the backoff of an endpoint that could not be bound.
type retry struct {
	// failures counts the binds that failed in a row; zero once bound.
	failures int
	// next is when the next attempt is due.
	next time.Time
}

// failed records a failed bind at now and returns the wait before the next attempt:
// firstRebindWait, doubling up to longestRebindWait.
func (r *retry) failed(now time.Time) time.Duration {
	d := min(firstRebindWait<<min(r.failures, 8), longestRebindWait)
	r.failures++
	r.next = now.Add(d)
	return d
}

// New binds the peer and admin listeners (so their errors surface at once) and returns
// a sidecar ready to Start.
func New(cfg Config, source discovery.Source, log logr.Logger) (*Sidecar, error) {
	var inc [8]byte
	_, _ = rand.Read(inc[:])
	s := &Sidecar{
		cfg: cfg, log: log, source: source, reg: prometheus.NewRegistry(),
		self:   peer.Identity{Namespace: cfg.Namespace, Name: cfg.Name, UID: cfg.UID, Incarnation: binary.BigEndian.Uint64(inc[:]) | 1},
		served: map[string]*served{}, links: map[string]*peer.Link{}, rebind: make(chan struct{}, 1),
	}
	s.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	build := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "podipc_build_info", Help: "The sidecar's version."}, []string{"version"})
	build.WithLabelValues(Version).Set(1)
	s.reg.MustRegister(build)
	s.router = router.New(log.WithName("router"), router.NewMetrics(s.reg))
	s.router.UseBudget(s.newBudget())
	s.pmetrics = peer.NewMetrics(s.reg)
	s.members = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "podipc_members",
		Help: "Remote members of each channel, by state (ready, serving), as discovery reports them."}, []string{"channel", "state"})
	s.unbound = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "podipc_endpoint_unbound",
		Help: "1 while a served channel's endpoint (line port, node-ipc socket) cannot be bound and is being retried, 0 once bound."},
		[]string{"channel", "endpoint"})
	s.appRefused = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "podipc_app_refused_total",
		Help: "App connections refused by a served channel's endpoint (line port, node-ipc socket), by reason."},
		[]string{"channel", "endpoint", "reason"})
	s.reg.MustRegister(s.members, s.unbound, s.appRefused)

	if err := s.newSecure(); err != nil {
		return nil, err
	}
	var lc net.ListenConfig
	peerLn, err := lc.Listen(context.Background(), "tcp", withPort(cfg.PeerAddress, PeerPort))
	if err != nil {
		return nil, fmt.Errorf("listen on peer port: %w", err)
	}
	s.server = peer.NewServer(peerLn, peer.ServerConfig{Self: s.self, Router: s.router, Authorize: s.authorize,
		Shared: s.sharedChannels, ReceiveOnly: s.receiveOnlyChannels, Log: log.WithName("peer"), Metrics: s.pmetrics, Keepalive: cfg.Keepalive,
		MaxConnections: cfg.PeerMaxConnections, MaxConnectionsPerIP: cfg.PeerMaxConnectionsPerIP, Secure: s.secure})
	s.adminLn, err = lc.Listen(context.Background(), "tcp", withPort(cfg.AdminAddress, AdminPort))
	if err != nil {
		_ = peerLn.Close()
		return nil, fmt.Errorf("listen on admin port: %w", err)
	}
	s.admin = &http.Server{Handler: s.adminHandler(), ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout: time.Minute, MaxHeaderBytes: 16 << 10}
	return s, nil
}

// newSecure builds the peer links' TLS, unless the mode is Disabled, from the
// certificate files (loaded now) or, with an identity URL, from the workload certificate
// WithIdentity provides.
func (s *Sidecar) newSecure() error {
	var src peertls.Source
	var trustDomain string
	switch {
	case s.cfg.PeerTLS == peertls.Disabled:
	case s.cfg.TLSCert != "":
		s.files = &peertls.Files{CertFile: s.cfg.TLSCert, KeyFile: s.cfg.TLSKey, CAFile: s.cfg.TLSCA, Log: s.log.WithName("peertls"),
			Pod: peertls.Pod{Namespace: s.cfg.Namespace, Name: s.cfg.Name, UID: s.cfg.UID}}
		if err := s.files.Load(); err != nil {
			return err
		}
		src = s.files
	case s.cfg.IdentityURL != "":
		s.workload = &peertls.Workload{}
		src, trustDomain = s.workload, s.cfg.TrustDomain
	}
	m := peertls.NewMetrics(s.reg, src)
	if s.cfg.PeerTLS == peertls.Disabled {
		if s.cfg.peerTLSFlag == "" {
			s.log.Info("Peer links are plaintext: Kubernetes mode without a certificate source (no --identity-url: " +
				"the controller runs with workload identity off; or set --tls-cert, --tls-key and --tls-ca)")
		} else {
			s.log.Info("Peer links are plaintext (--peer-tls=Disabled)")
		}
		return nil
	}
	s.secure = &peertls.Policy{Mode: s.cfg.PeerTLS, Source: src, TrustDomain: trustDomain, Log: s.log.WithName("peertls"), Metrics: m,
		ServiceAccountOf: s.serviceAccountOf}
	if s.workload != nil {
		s.log.Info("Peer links use mutual TLS with the workload certificate", "mode", s.cfg.PeerTLS, "trustDomain", trustDomain)
		return nil
	}
	c, _ := src.Certificate()
	s.log.Info("Peer links use mutual TLS", "mode", s.cfg.PeerTLS, "notAfter", c.Leaf.NotAfter, "uris", fmt.Sprint(c.Leaf.URIs))
	return nil
}

// PeerAddr returns the bound peer address.
func (s *Sidecar) PeerAddr() net.Addr { return s.server.Addr() }

// AdminAddr returns the bound admin address.
func (s *Sidecar) AdminAddr() net.Addr { return s.adminLn.Addr() }

// Start serves until ctx ends, then drains within the drain timeout and returns.
func (s *Sidecar) Start(ctx context.Context) error {
	s.log.Info("Starting sidecar", "pod", s.cfg.Namespace+"/"+s.cfg.Name, "uid", s.cfg.UID,
		"incarnation", s.self.Incarnation, "channels", s.cfg.Channels, "version", Version)
	if s.workload != nil && s.workload.Client == nil {
		return errors.New("peer links use the workload certificate (--identity-url), but WithIdentity was not called")
	}
	runCtx, cancelRun := context.WithCancel(context.Background())
	defer cancelRun()
	s.linkCtx = runCtx
	s.run(func() {
		if err := s.server.Start(runCtx); err != nil {
			s.log.Error(err, "Peer server stopped")
		}
	})
	if s.files != nil {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			_ = s.files.Start(runCtx)
		}()
	}
	s.wg.Add(2)
	go func() {
		defer s.wg.Done()
		if err := s.admin.Serve(s.adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error(err, "Admin server failed")
		}
	}()
	go func() {
		defer s.wg.Done()
		s.rebindLoop(runCtx)
	}()
	if s.identity != nil {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			if err := s.identity.Start(runCtx); err != nil {
				s.log.Error(err, "Workload identity stopped")
			}
		}()
	}
	discCtx, stopDiscovery := context.WithCancel(runCtx)
	discDone := make(chan error, 1)
	go func() {
		discDone <- s.source.Run(discCtx, s.apply)
	}()
	var err error
	select {
	case <-ctx.Done():
	case err = <-discDone:
		if err == nil {
			err = errors.New("discovery stopped")
		}
		s.log.Error(err, "Discovery failed")
	}
	stopDiscovery()
	if err == nil {
		if derr := <-discDone; derr != nil {
			s.log.Error(derr, "Discovery stopped with an error")
		}
	}
	s.drain()
	cancelRun()
	s.wg.Wait()
	return err
}

// run runs f in a goroutine that Start joins before it returns.
func (s *Sidecar) run(f func()) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		f()
	}()
}

// drain is the SIGTERM sequence: not ready, stop accepting and reading apps, let the
// peers acknowledge what is queued (bounded by the drain timeout), say goodbye, close.
func (s *Sidecar) drain() {
	s.draining.Store(true)
	s.log.Info("Draining", "timeout", s.cfg.DrainTimeout)
	// Links and the server call back into authorize and sharedChannels, which take
	// s.mu: work on a copy so the waits below never hold it.
	s.mu.Lock()
	links := s.links
	servedChannels := s.served
	s.links, s.served = map[string]*peer.Link{}, map[string]*served{}
	s.mu.Unlock()
	// The endpoints stop reading apps now and keep writing lines from peers until
	// the links and the server are done.
	endpointsCtx, endEndpoints := context.WithCancel(context.Background())
	var endpoints sync.WaitGroup
	for _, sv := range servedChannels {
		for _, ep := range sv.endpoints() {
			endpoints.Add(1)
			go func() {
				defer endpoints.Done()
				_ = ep.Shutdown(endpointsCtx)
			}()
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.DrainTimeout)
	var wg sync.WaitGroup
	for _, l := range links {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = l.Shutdown(ctx) // what is left is counted dropped shutdown
		}()
	}
	wg.Wait()
	cancel()
	sctx, scancel := context.WithTimeout(context.Background(), goodbyeTimeout)
	_ = s.server.Shutdown(sctx)
	scancel()
	s.logClosing(servedChannels, "sidecar shutting down")
	endEndpoints()
	endpoints.Wait()
	s.router.Close()
	actx, acancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer acancel()
	_ = s.admin.Shutdown(actx)
	// The last word on what this process counted: a drop after the last scrape of
	// /metrics would otherwise leave with it (the fault suite reads this line).
	s.log.Info("Drained", "dropped", s.router.DroppedTotals())
}

// goodbyeTimeout bounds how long the drain waits for senders to close their links
// after the peer server's GOODBYE.
const goodbyeTimeout = time.Second

// endpoints returns the endpoints of sv that are bound.
func (sv *served) endpoints() []*endpoint.Endpoint {
	var eps []*endpoint.Endpoint
	for _, ep := range []*endpoint.Endpoint{sv.lines, sv.nodeipc} {
		if ep != nil {
			eps = append(eps, ep)
		}
	}
	return eps
}

// logClosing logs, for each channel that has app connections, that they are closed
// and why.
func (s *Sidecar) logClosing(svs map[string]*served, reason string) {
	for name, sv := range svs {
		n := 0
		for _, ep := range sv.endpoints() {
			n += ep.Connections()
		}
		if n > 0 {
			s.log.Info("Closing app connections", "channel", name, "reason", reason, "connections", n)
		}
	}
}

// close closes sv's endpoints.
func (sv *served) close() {
	for _, ep := range sv.endpoints() {
		_ = ep.Close()
	}
}

// apply makes the running sidecar match a snapshot, touching only what changed.
func (s *Sidecar) apply(st discovery.State) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining.Load() {
		return
	}
	s.state.Store(&st)
	for name, sv := range s.served {
		if _, ok := st.Channels[name]; !ok {
			s.logClosing(map[string]*served{name: sv}, "channel deleted")
			sv.close()
			s.router.Remove(name)
			delete(s.served, name)
			s.log.Info("Stopped serving channel", "channel", name, "reason", "channel deleted")
		}
	}
	for name, ch := range st.Channels {
		s.serve(name, ch.Spec)
	}
	s.reportEndpoints()
	s.applyLinks(st)
	s.server.Revalidate()
	if !s.synced.Swap(true) {
		if n := s.unboundLines.Load(); n > 0 {
			s.log.Info("Discovery synced; not ready until every line port is bound", "channels", len(s.served), "unbound", n)
		} else {
			s.log.Info("Discovery synced; ready", "channels", len(s.served))
		}
	}
}

// serve starts or updates a channel's endpoints. An endpoint that cannot be bound is
// retried by rebindLoop, with backoff, without waiting for another snapshot.
func (s *Sidecar) serve(name string, spec discovery.Spec) {
	ch := s.router.Ensure(name, spec)
	sv := s.served[name]
	if sv != nil && sv.spec.LocalPort != spec.LocalPort {
		if sv.lines != nil {
			s.logClosing(map[string]*served{name: {lines: sv.lines}}, "localPort changed")
			_ = sv.lines.Close()
			sv.lines = nil
		}
		sv.linesRetry = retry{} // a new port is tried at once
	}
	if sv == nil {
		sv = &served{}
		s.served[name] = sv
		s.log.Info("Serving channel", "channel", name, "localPort", spec.LocalPort, "delivery", spec.Delivery)
	}
	sv.spec = spec
	if !s.bindDue(name, ch, sv, time.Now()) {
		wake.Up(s.rebind)
	}
}

// bindDue binds those of sv's missing endpoints whose retry is due at now, and reports
// whether every endpoint is bound. Called with s.mu held.
func (s *Sidecar) bindDue(name string, ch *router.Channel, sv *served, now time.Time) bool {
	log := s.log.WithName("endpoint")
	if sv.lines == nil && !now.Before(sv.linesRetry.next) {
		addr := net.JoinHostPort(s.cfg.AppAddress, strconv.Itoa(sv.spec.LocalPort))
		ep, err := endpoint.ListenLines(ch, addr, s.endpointOptions(name, "line"), log)
		sv.lines = s.started(ep, err, &sv.linesRetry, name, "line", now)
	}
	if sv.nodeipc == nil && s.cfg.SocketDir != "" && !now.Before(sv.nodeipcRetry.next) {
		path := ipc.SocketPath(filepath.Clean(s.cfg.SocketDir)+"/", ipc.DefaultAppspace, name)
		ep, err := endpoint.ListenNodeIPC(ch, path, s.endpointOptions(name, "nodeipc"), log)
		sv.nodeipc = s.started(ep, err, &sv.nodeipcRetry, name, "nodeipc", now)
	}
	return sv.lines != nil && (sv.nodeipc != nil || s.cfg.SocketDir == "")
}

// endpointOptions returns the limits of the endpoint kind (line, nodeipc) of channel.
func (s *Sidecar) endpointOptions(channel, kind string) endpoint.Options {
	return endpoint.Options{MaxConnections: s.cfg.MaxAppConnections,
		Refused: s.appRefused.WithLabelValues(channel, kind, "connection_limit")}
}

// started starts ep if it was bound (err is nil) and returns it; otherwise it schedules
// the next attempt and returns nil. The first failure in a row is logged as an error,
// the retries at V(1).
func (s *Sidecar) started(ep *endpoint.Endpoint, err error, r *retry, channel, kind string, now time.Time) *endpoint.Endpoint {
	if err != nil {
		wait := r.failed(now)
		if r.failures == 1 {
			s.log.Error(err, "Cannot bind channel endpoint; retrying with backoff", "channel", channel, "endpoint", kind, "retryIn", wait)
		} else {
			s.log.V(1).Info("Still cannot bind channel endpoint", "channel", channel, "endpoint", kind,
				"attempt", r.failures, "retryIn", wait, "err", err.Error())
		}
		return nil
	}
	if r.failures > 0 {
		s.log.Info("Bound channel endpoint after retrying", "channel", channel, "endpoint", kind, "attempts", r.failures+1)
	}
	*r = retry{}
	ctx := s.linkCtx
	s.run(func() {
		if err := ep.Start(ctx); err != nil && !errors.Is(err, net.ErrClosed) {
			s.log.Error(err, "Channel endpoint stopped", "channel", channel, "endpoint", kind)
		}
	})
	return ep
}

// rebindLoop retries the endpoints that could not be bound, each on its own backoff,
// until ctx ends. Without it a line port that was briefly taken (say, by a process of
// the pod still shutting down) would wait for the next discovery snapshot, which may
// never come: the static file may not change, nor the Channel and its EndpointSlices.
// A channel that is no longer served leaves s.served, and with it the retries.
func (s *Sidecar) rebindLoop(ctx context.Context) {
	t := time.NewTimer(longestRebindWait)
	t.Stop()
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.rebind:
		case <-t.C:
		}
		if next := s.rebindDue(time.Now()); next.IsZero() {
			t.Stop()
		} else {
			t.Reset(time.Until(next))
		}
	}
}

// rebindDue binds the missing endpoints whose retry is due and returns when the next
// retry is due (zero if none is needed).
func (s *Sidecar) rebindDue(now time.Time) time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining.Load() {
		return time.Time{}
	}
	var next time.Time
	for name, sv := range s.served {
		ch := s.router.Channel(name)
		if ch == nil || s.bindDue(name, ch, sv, now) {
			continue
		}
		for _, r := range []retry{sv.linesRetry, sv.nodeipcRetry} {
			if r.failures > 0 && (next.IsZero() || r.next.Before(next)) {
				next = r.next
			}
		}
	}
	s.reportEndpoints()
	return next
}

// reportEndpoints publishes which endpoints are bound: the podipc_endpoint_unbound
// series and the count readiness looks at. Called with s.mu held.
func (s *Sidecar) reportEndpoints() {
	s.unbound.Reset() // channels no longer served lose their series
	var lines int32
	for name, sv := range s.served {
		s.unbound.WithLabelValues(name, "line").Set(b2f(sv.lines == nil))
		if sv.lines == nil {
			lines++
		}
		if s.cfg.SocketDir != "" {
			s.unbound.WithLabelValues(name, "nodeipc").Set(b2f(sv.nodeipc == nil))
		}
	}
	s.unboundLines.Store(lines)
}

// applyLinks keeps one link per remote member pod and gives each channel its remotes.
func (s *Sidecar) applyLinks(st discovery.State) {
	want := map[string]discovery.Member{}
	for _, ch := range st.Channels {
		for _, m := range ch.Members {
			if m.UID != s.cfg.UID {
				want[m.UID] = m
			}
		}
	}
	for uid, l := range s.links {
		m, ok := want[uid]
		old := l.Member()
		if ok && m.IP == old.IP && m.PeerPort == old.PeerPort && m.Namespace == old.Namespace && m.Name == old.Name {
			continue
		}
		s.log.Info("Closing peer link", "peer", old.Namespace+"/"+old.Name, "reason", "no longer a member or moved")
		_ = l.Close() // Broadcast lines counted dropped peer_removed, AnyOne rerouted
		delete(s.links, uid)
	}
	for uid, m := range want {
		if s.links[uid] != nil {
			continue
		}
		l := peer.NewLink(peer.LinkConfig{Self: s.self, Member: m, LocalIP: host(withPort(s.cfg.PeerAddress, PeerPort)),
			Channels: func() []string { return s.sharedChannels(uid) }, Router: s.router,
			Log: s.log.WithName("peer"), Metrics: s.pmetrics, Keepalive: s.cfg.Keepalive, Secure: s.secure})
		ctx := s.linkCtx
		s.run(func() { _ = l.Start(ctx) })
		s.links[uid] = l
	}
	s.members.Reset() // channels no longer in the snapshot lose their samples
	for name, ch := range st.Channels {
		rc := s.router.Channel(name)
		var remotes []router.Remote
		var ready, serving []bool
		var nready, nserving float64
		for _, m := range ch.Members {
			if l := s.links[m.UID]; l != nil {
				remotes = append(remotes, l)
				ready = append(ready, m.Ready && !m.Terminating)
				serving = append(serving, m.Serving)
				nready += b2f(m.Ready && !m.Terminating)
				nserving += b2f(m.Serving)
			}
		}
		rc.SetMembers(remotes, ready, serving)
		s.members.WithLabelValues(name, "ready").Set(nready)
		s.members.WithLabelValues(name, "serving").Set(nserving)
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// sharedChannels lists the channels the pod shares with the member uid.
func (s *Sidecar) sharedChannels(uid string) []string {
	var out []string
	st := s.state.Load()
	if st == nil {
		return nil
	}
	for name, ch := range st.Channels {
		if slices.ContainsFunc(ch.Members, func(m discovery.Member) bool { return m.UID == uid }) {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// receiveOnlyChannels lists the channels on which the member uid may only receive, as
// discovery publishes them (the controller's EndpointSlices, or the static file).
func (s *Sidecar) receiveOnlyChannels(uid string) []string {
	var out []string
	st := s.state.Load()
	if st == nil {
		return nil
	}
	for name, ch := range st.Channels {
		if slices.ContainsFunc(ch.Members, func(m discovery.Member) bool { return m.UID == uid && m.ReceiveOnly }) {
			out = append(out, name)
		}
	}
	return out
}

// serviceAccountOf returns the service account discovery publishes for the member uid,
// "" if it publishes none (then a certificate's account is not compared).
func (s *Sidecar) serviceAccountOf(uid string) string {
	st := s.state.Load()
	if st == nil {
		return ""
	}
	for _, ch := range st.Channels {
		for _, m := range ch.Members {
			if m.UID == uid && m.ServiceAccount != "" {
				return m.ServiceAccount
			}
		}
	}
	return ""
}

// authorize accepts a peer only if it is a current member of a channel this pod serves
// with the identity and IP discovery reports.
func (s *Sidecar) authorize(id peer.Identity, ip string) string {
	st := s.state.Load()
	if st == nil {
		return "discovery has not synced yet"
	}
	for _, ch := range st.Channels {
		for _, m := range ch.Members {
			if m.UID != id.UID || m.UID == s.cfg.UID {
				continue
			}
			if m.Namespace != id.Namespace || m.Name != id.Name {
				return fmt.Sprintf("pod UID %s is %s/%s, not %s/%s", m.UID, m.Namespace, m.Name, id.Namespace, id.Name)
			}
			if net.ParseIP(m.IP).String() != net.ParseIP(ip).String() {
				return fmt.Sprintf("pod %s/%s has IP %s, but the link comes from %s", m.Namespace, m.Name, m.IP, ip)
			}
			return ""
		}
	}
	return fmt.Sprintf("pod %s/%s (UID %s) is not a member of a channel this pod serves", id.Namespace, id.Name, id.UID)
}

// resetPeers aborts every peer connection with a TCP reset (test-only endpoint).
func (s *Sidecar) resetPeers() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, l := range s.links {
		l.Reset()
	}
	s.server.Reset()
}

func (s *Sidecar) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	// Ready means: not draining, discovery has synced once, and — until the first time
	// it was ready — every channel served has its line port bound, so that an app the
	// startup probe lets start can connect. A Channel created later whose port cannot
	// be bound does not make the pod (and every Service it backs) not ready: that is a
	// problem of one channel, reported by its log and podipc_endpoint_unbound. Channels
	// the pod names that do not exist yet are not waited for (docs/design.md §7.2). Nor is the node-ipc socket, which is retried the same way and shows in
	// podipc_endpoint_unbound: the line port is what every app can use, and outside
	// Kubernetes the default --socket-dir may not be writable at all.
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		switch {
		case s.draining.Load():
			http.Error(w, "draining", http.StatusServiceUnavailable)
		case !s.synced.Load():
			http.Error(w, "discovery not synced", http.StatusServiceUnavailable)
		case s.unboundLines.Load() > 0 && !s.readyOnce.Load():
			http.Error(w, fmt.Sprintf("line port of %d channel(s) not bound yet (retrying)", s.unboundLines.Load()),
				http.StatusServiceUnavailable)
		default:
			s.readyOnce.Store(true)
			_, _ = w.Write([]byte("ok\n"))
		}
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{}))
	if s.cfg.DebugEndpoints {
		mux.HandleFunc("POST /debug/reset-peers", func(w http.ResponseWriter, _ *http.Request) {
			s.log.Info("Resetting every peer link (debug endpoint)")
			s.resetPeers()
			_, _ = w.Write([]byte("reset\n"))
		})
	}
	return mux
}

// newBudget creates the memory budget of the flags (nil: unbounded) and its gauges.
func (s *Sidecar) newBudget() *buffer.Budget {
	limit := s.cfg.MemoryBudget
	if limit == 0 {
		// Unbounded: still counted, for podipc_memory_used_bytes.
		limit = math.MaxInt64 / 2
	}
	b := buffer.NewBudget(limit)
	s.reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "podipc_memory_budget_bytes",
			Help: "The bytes all queues, retransmit windows and read buffers may hold together (0: unbounded)."},
			func() float64 { return float64(s.cfg.MemoryBudget) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "podipc_memory_used_bytes",
			Help: "The bytes queues, retransmit windows and read buffers hold now, counted against podipc_memory_budget_bytes."},
			func() float64 { return float64(b.Used()) }))
	return b
}
