// Package sidecar wires the data plane of one pod: discovery feeds the router and the
// peer links, endpoints serve the apps, and an admin server reports health, readiness
// and metrics. Its Start runs until the context ends and then drains (DESIGN §5
// lifecycle).
package sidecar

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
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

	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/endpoint"
	"github.com/podipc/podipc/pkg/ipc"
	"github.com/podipc/podipc/pkg/peer"
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
	server  *peer.Server
	admin   *http.Server
	adminLn net.Listener

	mu sync.Mutex
	// state is the last snapshot applied. Links and the peer server read it (through
	// sharedChannels and authorize) without s.mu, which apply holds while it closes
	// links that may be inside those callbacks.
	state    atomic.Pointer[discovery.State]
	served   map[string]*served
	links    map[string]*peer.Link
	linkCtx  context.Context
	synced   atomic.Bool
	draining atomic.Bool
	wg       sync.WaitGroup
}

// served is a channel with its two endpoints.
type served struct {
	spec    discovery.Spec
	lines   *endpoint.Endpoint
	nodeipc *endpoint.Endpoint
}

// New binds the peer and admin listeners (so their errors surface at once) and returns
// a sidecar ready to Start.
func New(cfg Config, source discovery.Source, log logr.Logger) (*Sidecar, error) {
	var inc [8]byte
	_, _ = rand.Read(inc[:])
	s := &Sidecar{
		cfg: cfg, log: log, source: source, reg: prometheus.NewRegistry(),
		self:   peer.Identity{Namespace: cfg.Namespace, Name: cfg.Name, UID: cfg.UID, Incarnation: binary.BigEndian.Uint64(inc[:]) | 1},
		served: map[string]*served{}, links: map[string]*peer.Link{},
	}
	s.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	build := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "podipc_build_info", Help: "The sidecar's version."}, []string{"version"})
	build.WithLabelValues(Version).Set(1)
	s.reg.MustRegister(build)
	s.router = router.New(log.WithName("router"), router.NewMetrics(s.reg))
	s.pmetrics = peer.NewMetrics(s.reg)
	s.members = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "podipc_members",
		Help: "Remote members of each channel, by state (ready, serving), as discovery reports them."}, []string{"channel", "state"})
	s.reg.MustRegister(s.members)

	var lc net.ListenConfig
	peerLn, err := lc.Listen(context.Background(), "tcp", withPort(cfg.PeerAddress, PeerPort))
	if err != nil {
		return nil, fmt.Errorf("listen on peer port: %w", err)
	}
	s.server = peer.NewServer(peerLn, peer.ServerConfig{Self: s.self, Router: s.router, Authorize: s.authorize,
		Log: log.WithName("peer"), Metrics: s.pmetrics, Keepalive: cfg.Keepalive})
	s.adminLn, err = lc.Listen(context.Background(), "tcp", withPort(cfg.AdminAddress, AdminPort))
	if err != nil {
		_ = peerLn.Close()
		return nil, fmt.Errorf("listen on admin port: %w", err)
	}
	s.admin = &http.Server{Handler: s.adminHandler(), ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout: time.Minute, MaxHeaderBytes: 16 << 10}
	return s, nil
}

// PeerAddr returns the bound peer address.
func (s *Sidecar) PeerAddr() net.Addr { return s.server.Addr() }

// AdminAddr returns the bound admin address.
func (s *Sidecar) AdminAddr() net.Addr { return s.adminLn.Addr() }

// Start serves until ctx ends, then drains within the drain timeout and returns.
func (s *Sidecar) Start(ctx context.Context) error {
	s.log.Info("Starting sidecar", "pod", s.cfg.Namespace+"/"+s.cfg.Name, "uid", s.cfg.UID,
		"incarnation", s.self.Incarnation, "channels", s.cfg.Channels, "version", Version)
	runCtx, cancelRun := context.WithCancel(context.Background())
	defer cancelRun()
	s.linkCtx = runCtx
	if err := s.server.Start(runCtx); err != nil {
		return err
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := s.admin.Serve(s.adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error(err, "Admin server failed")
		}
	}()
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
	for _, sv := range servedChannels {
		sv.drain()
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.DrainTimeout)
	var wg sync.WaitGroup
	for _, l := range links {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l.Drain(ctx)
		}()
	}
	wg.Wait()
	cancel()
	s.server.Close(time.Second)
	for _, l := range links {
		l.Close(router.ReasonShutdown)
	}
	for _, sv := range servedChannels {
		sv.close("sidecar shutting down")
	}
	s.router.Close()
	sctx, scancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer scancel()
	_ = s.admin.Shutdown(sctx)
	s.log.Info("Drained")
}

func (sv *served) drain() {
	if sv.lines != nil {
		sv.lines.Drain()
	}
	if sv.nodeipc != nil {
		sv.nodeipc.Drain()
	}
}

func (sv *served) close(reason string) {
	if sv.lines != nil {
		sv.lines.Close(reason)
	}
	if sv.nodeipc != nil {
		sv.nodeipc.Close(reason)
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
			sv.close("channel deleted")
			s.router.Remove(name)
			delete(s.served, name)
			s.log.Info("Stopped serving channel", "channel", name, "reason", "channel deleted")
		}
	}
	for name, ch := range st.Channels {
		s.serve(name, ch.Spec)
	}
	s.applyLinks(st)
	s.server.Revalidate()
	if !s.synced.Swap(true) {
		s.log.Info("Discovery synced; ready", "channels", len(s.served))
	}
}

// serve starts or updates a channel's endpoints.
func (s *Sidecar) serve(name string, spec discovery.Spec) {
	ch := s.router.Ensure(name, spec)
	sv := s.served[name]
	if sv != nil && sv.spec.LocalPort != spec.LocalPort && sv.lines != nil {
		sv.lines.Close("localPort changed")
		sv.lines = nil
	}
	if sv == nil {
		sv = &served{}
		s.served[name] = sv
		s.log.Info("Serving channel", "channel", name, "localPort", spec.LocalPort, "delivery", spec.Delivery)
	}
	sv.spec = spec
	if sv.lines == nil {
		addr := net.JoinHostPort(s.cfg.AppAddress, strconv.Itoa(spec.LocalPort))
		if ep, err := endpoint.ListenLines(ch, addr, s.log.WithName("endpoint")); err != nil {
			s.log.Error(err, "Cannot serve channel's line port; retrying at the next snapshot", "channel", name)
		} else {
			sv.lines = ep
			_ = ep.Start(s.linkCtx)
		}
	}
	if sv.nodeipc == nil && s.cfg.SocketDir != "" {
		path := ipc.SocketPath(filepath.Clean(s.cfg.SocketDir)+"/", ipc.DefaultAppspace, name)
		if ep, err := endpoint.ListenNodeIPC(ch, path, s.log.WithName("endpoint")); err != nil {
			s.log.Error(err, "Cannot serve channel's node-ipc socket; retrying at the next snapshot", "channel", name)
		} else {
			sv.nodeipc = ep
			_ = ep.Start(s.linkCtx)
		}
	}
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
		l.Close(router.ReasonPeerRemoved)
		delete(s.links, uid)
	}
	for uid, m := range want {
		if s.links[uid] != nil {
			continue
		}
		l := peer.NewLink(peer.LinkConfig{Self: s.self, Member: m, LocalIP: host(withPort(s.cfg.PeerAddress, PeerPort)),
			Channels: func() []string { return s.sharedChannels(uid) }, Router: s.router,
			Log: s.log.WithName("peer"), Metrics: s.pmetrics, Keepalive: s.cfg.Keepalive})
		_ = l.Start(s.linkCtx)
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
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		switch {
		case s.draining.Load():
			http.Error(w, "draining", http.StatusServiceUnavailable)
		case !s.synced.Load():
			http.Error(w, "discovery not synced", http.StatusServiceUnavailable)
		default:
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
