package sidecar

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/podipc/podipc/pkg/endpoint"
	"github.com/podipc/podipc/pkg/peer"
	"github.com/podipc/podipc/pkg/peertls"
)

// Well-known ports (docs/design.md §3.2).
const (
	PeerPort  = 7701
	AdminPort = 7702
)

// Config is the sidecar's configuration: the pod's identity from the environment
// (downward API) and the flags.
type Config struct {
	Namespace, Name, UID, IP string
	// Channels are the channel names of PODIPC_CHANNELS.
	Channels []string

	Discovery      string
	Kubeconfig     string
	StaticConfig   string
	AppAddress     string
	PeerAddress    string
	AdminAddress   string
	SocketDir      string
	DrainTimeout   time.Duration
	LogLevel       string
	DebugEndpoints bool
	Keepalive      time.Duration
	// PeerMaxConnections and PeerMaxConnectionsPerIP cap the connections open on the
	// peer port, in all and per source address.
	PeerMaxConnections      int
	PeerMaxConnectionsPerIP int
	// PeerTLS is the peer links' mode; TLSCert, TLSKey and TLSCA are the certificate
	// source's files (all three or none).
	PeerTLS                peertls.Mode
	TLSCert, TLSKey, TLSCA string
	// peerTLSFlag is --peer-tls as given ("" if unset), from which validate derives PeerTLS.
	peerTLSFlag string
	// MaxAppConnections caps the app connections of each line port and node-ipc socket.
	MaxAppConnections int

	// IdentityURL is the controller's identity endpoint; empty means the sidecar holds no
	// workload certificate (static mode, or a controller with identity off).
	IdentityURL string
	// IdentityTokenFile is the projected service-account token of audience
	// podipc.dev/identity.
	IdentityTokenFile string
	// TrustBundleRefresh is how often the trust bundle ConfigMap is read again; it must stay
	// well below the controller's --identity-propagation-delay.
	TrustBundleRefresh time.Duration
	// TrustDomain is the SPIFFE trust domain.
	TrustDomain string
	// TrustBundle is the ConfigMap holding the trust bundle, as <namespace>/<name>.
	TrustBundle string

	// MemoryLimit is the container's memory limit in bytes (--memory-limit, default
	// $PODIPC_MEMORY_LIMIT from the downward API; 0: none), and MemoryBudget the bytes
	// all queues, retransmit windows and read buffers may hold together (--memory-budget,
	// default MemoryBudgetShare of the limit; 0: unbounded). docs/design.md §8.7.
	MemoryLimit, MemoryBudget         int64
	memoryLimitFlag, memoryBudgetFlag string

	// MaxProcs is how many OS threads may run the sidecar's Go code at once (GOMAXPROCS;
	// --max-procs, default $PODIPC_MAX_PROCS, else DefaultMaxProcs; 0: the Go runtime's own
	// choice, the container's CPU limit or else every CPU). docs/design.md §8.8.
	MaxProcs     int
	maxProcsFlag string
}

// DefaultMaxProcs is the sidecar's GOMAXPROCS unless told otherwise: one, as Linkerd runs
// its proxies with one worker. A sidecar forwards one pod's lines; with more Ps than it can
// keep busy the scheduler wakes idle threads to steal work at every hand-off, which on a
// node full of sidecars costs more CPU than it buys (docs/performance.md §7).
const DefaultMaxProcs = 1

// EnvMaxProcs is the default of --max-procs: the webhook sets it from the chart's
// sidecar.maxProcs or the pod's podipc.dev/sidecar-max-procs annotation.
const EnvMaxProcs = "PODIPC_MAX_PROCS"

// The shares of the memory limit (docs/design.md §8.7): the Go runtime's soft limit
// (GOMEMLIMIT) is set to SoftLimitShare of it, so the collector works harder before the
// kernel's OOM killer acts, and the queues' budget is MemoryBudgetShare, leaving the
// other half for the runtime, goroutine stacks, per-link state and the encoding
// buffers of links, and the garbage between two collections.
const (
	SoftLimitPercent    = 90
	MemoryBudgetPercent = 50
	// MinMemoryBudget is the smallest budget accepted: room for a few lines in flight
	// on a few links.
	MinMemoryBudget = 1 << 20
)

// ParseConfig reads the environment through getenv and parses args (without the
// program name).
func ParseConfig(args []string, getenv func(string) string) (Config, error) {
	c := Config{
		Namespace: getenv("PODIPC_POD_NAMESPACE"),
		Name:      getenv("PODIPC_POD_NAME"),
		UID:       getenv("PODIPC_POD_UID"),
		IP:        getenv("PODIPC_POD_IP"),
	}
	for _, ch := range strings.Split(getenv("PODIPC_CHANNELS"), ",") {
		if ch = strings.TrimSpace(ch); ch != "" {
			c.Channels = append(c.Channels, ch)
		}
	}
	fs := flag.NewFlagSet("podipc-sidecar", flag.ContinueOnError)
	fs.StringVar(&c.Discovery, "discovery", "kubernetes", "Where channel specs and members come from: kubernetes or static.")
	fs.StringVar(&c.Kubeconfig, "kubeconfig", getenv("KUBECONFIG"), "With --discovery=kubernetes outside a pod: the kubeconfig to reach the API server with (default $KUBECONFIG; unset in a pod, where the service-account token is used).")
	fs.StringVar(&c.StaticConfig, "static-config", "", "The static discovery file (YAML), re-read every second and on SIGHUP.")
	fs.StringVar(&c.AppAddress, "app-address", "127.0.0.1", "The host the channels' line ports are bound on.")
	fs.StringVar(&c.PeerAddress, "peer-address", c.IP, "The host (or host:port) of the peer port (7701); also the source address of outbound links.")
	fs.StringVar(&c.AdminAddress, "admin-address", c.IP, "The host (or host:port) of the admin port (7702): /healthz, /readyz, /metrics.")
	fs.StringVar(&c.SocketDir, "socket-dir", "/var/run/podipc", "The directory of the node-ipc sockets (app.<channel>).")
	fs.DurationVar(&c.DrainTimeout, "drain-timeout", 5*time.Second, "How long SIGTERM waits for queued lines to be acknowledged by peers.")
	fs.StringVar(&c.LogLevel, "log-level", "info", "Log verbosity: info, debug (V(1)), trace (V(4)) or a number.")
	fs.BoolVar(&c.DebugEndpoints, "debug-endpoints", false, "Serve test-only admin endpoints (POST /debug/reset-peers).")
	fs.DurationVar(&c.Keepalive, "peer-keepalive", peer.DefaultKeepalive, "Idle interval between peer keepalives; three missed intervals end a link.")
	fs.IntVar(&c.PeerMaxConnections, "peer-max-connections", peer.DefaultMaxConnections, "Most connections open on the peer port (7701), authenticated or not; more are closed at once and counted.")
	fs.IntVar(&c.PeerMaxConnectionsPerIP, "peer-max-connections-per-ip", peer.DefaultMaxConnectionsPerIP, "Most connections open on the peer port from one source address.")
	fs.StringVar(&c.peerTLSFlag, "peer-tls", getenv(EnvPeerTLS), "Mutual TLS on peer links: Required, Permissive (also accept and dial plaintext peers, while a cluster upgrades) or Disabled (default $PODIPC_PEER_TLS, which the webhook sets from the chart's peerTLS; unset: Required with a certificate source, --tls-cert, --tls-key and --tls-ca or --identity-url, and see the README without one).")
	fs.StringVar(&c.TLSCert, "tls-cert", "", "PEM file of this pod's peer certificate (chain), re-read every second.")
	fs.StringVar(&c.TLSKey, "tls-key", "", "PEM file of the peer certificate's private key, re-read every second.")
	fs.StringVar(&c.TLSCA, "tls-ca", "", "PEM file of the trust bundle peer certificates must chain to (old and new roots during a rotation), re-read every second.")
	fs.IntVar(&c.MaxAppConnections, "max-app-connections", endpoint.DefaultMaxConnections,
		"The most app connections each channel's line port and node-ipc socket accept at once; a connection over it is closed at once and counted in podipc_app_refused_total.")
	fs.StringVar(&c.IdentityURL, "identity-url", getenv("PODIPC_IDENTITY_URL"), "The controller's identity endpoint (https://…; default $PODIPC_IDENTITY_URL); empty: hold no workload certificate. Kubernetes mode only.")
	fs.StringVar(&c.IdentityTokenFile, "identity-token-file", DefaultIdentityTokenFile, "The projected service-account token (audience podipc.dev/identity) presented to the identity endpoint.")
	fs.StringVar(&c.TrustDomain, "trust-domain", getenv("PODIPC_TRUST_DOMAIN"), "The SPIFFE trust domain of workload certificates (default $PODIPC_TRUST_DOMAIN).")
	fs.StringVar(&c.TrustBundle, "trust-bundle", getenv("PODIPC_TRUST_BUNDLE"), "The ConfigMap holding the trust bundle, as <namespace>/<name> (default $PODIPC_TRUST_BUNDLE).")
	fs.DurationVar(&c.TrustBundleRefresh, "trust-bundle-refresh", 30*time.Second, "How often the trust bundle is read again; keep it well below the controller's --identity-propagation-delay (10m by default).")
	fs.StringVar(&c.memoryLimitFlag, "memory-limit", getenv("PODIPC_MEMORY_LIMIT"), "The container's memory limit (bytes, or a quantity such as 48Mi; default $PODIPC_MEMORY_LIMIT, which the webhook sets from limits.memory). Sets the Go runtime's soft limit to 90% of it and the memory budget to 50%.")
	fs.StringVar(&c.memoryBudgetFlag, "memory-budget", "", "The bytes all queues, retransmit windows and read buffers may hold together (a quantity such as 16Mi; default half of --memory-limit, unbounded without one). When it is reached each channel's overflow policy applies as for a full queue, drops counted memory_budget.")
	c.maxProcsFlag = getenv(EnvMaxProcs)
	if c.maxProcsFlag == "" {
		c.maxProcsFlag = strconv.Itoa(DefaultMaxProcs)
	}
	fs.StringVar(&c.maxProcsFlag, "max-procs", c.maxProcsFlag, "How many OS threads may run the sidecar's Go code at once (GOMAXPROCS; default $PODIPC_MAX_PROCS, which the webhook sets from the chart's sidecar.maxProcs, else 1); 0 leaves the Go runtime's choice (the CPU limit, else every CPU). $GOMAXPROCS, if set, wins.")
	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	n, err := strconv.Atoi(c.maxProcsFlag)
	if err != nil || n < 0 {
		return Config{}, fmt.Errorf("--max-procs=%q (or $%s): want a whole number, 0 or more", c.maxProcsFlag, EnvMaxProcs)
	}
	c.MaxProcs = n
	if err := c.parseMemory(); err != nil {
		return Config{}, err
	}
	err = c.validate()
	if err == nil {
		c.PeerTLS, err = c.peerTLS()
	}
	return c, err
}

// EnvPeerTLS is the default of --peer-tls: the webhook sets it on every injected sidecar
// from the controller's --peer-tls (the chart's peerTLS value).
const EnvPeerTLS = "PODIPC_PEER_TLS"

// peerTLS derives the peer links' mode from --peer-tls and the certificate source: the
// files, or in Kubernetes mode the workload certificate of --identity-url. Without
// --peer-tls a sidecar with a certificate source requires mutual TLS, as Linkerd and
// Istio do; one without is refused in static mode, where the files are the only source,
// and runs plaintext in Kubernetes mode, where no source means the controller runs with
// workload identity off (the chart refuses peerTLS=Required then).
func (c Config) peerTLS() (peertls.Mode, error) {
	files := 0
	for _, f := range []string{c.TLSCert, c.TLSKey, c.TLSCA} {
		if f != "" {
			files++
		}
	}
	if files != 0 && files != 3 {
		return "", errors.New("--tls-cert, --tls-key and --tls-ca go together: set all three or none")
	}
	if files == 3 && c.IdentityURL != "" {
		return "", errors.New("--tls-cert, --tls-key and --tls-ca and --identity-url are two certificate sources for peer links: set one")
	}
	if c.peerTLSFlag == "" {
		switch {
		case files == 3 || c.IdentityURL != "":
			return peertls.Required, nil
		case c.Discovery == "static":
			return "", errors.New("peer links require mutual TLS by default: set --tls-cert, --tls-key and --tls-ca, " +
				"or --peer-tls=Disabled to run plaintext peer links")
		default:
			return peertls.Disabled, nil
		}
	}
	m, err := peertls.ParseMode(c.peerTLSFlag)
	if err != nil {
		return "", fmt.Errorf("--peer-tls=%w", err)
	}
	if m != peertls.Disabled && files == 0 && c.IdentityURL == "" {
		return "", fmt.Errorf("--peer-tls=%s needs a certificate: set --tls-cert, --tls-key and --tls-ca, or --identity-url in Kubernetes mode", m)
	}
	return m, nil
}

func (c Config) validate() error {
	var errs []error
	if c.UID == "" || c.Name == "" || c.Namespace == "" {
		errs = append(errs, errors.New("PODIPC_POD_NAMESPACE, PODIPC_POD_NAME and PODIPC_POD_UID must be set"))
	}
	if c.PeerAddress == "" || c.AdminAddress == "" {
		errs = append(errs, errors.New("PODIPC_POD_IP (or --peer-address and --admin-address) must be set"))
	}
	if c.PeerMaxConnections < 1 || c.PeerMaxConnectionsPerIP < 1 {
		errs = append(errs, errors.New("--peer-max-connections and --peer-max-connections-per-ip must be at least 1"))
	}
	if c.MaxAppConnections < 1 {
		errs = append(errs, fmt.Errorf("--max-app-connections=%d: want at least 1", c.MaxAppConnections))
	}
	switch c.Discovery {
	case "static":
		if c.StaticConfig == "" {
			errs = append(errs, errors.New("--discovery=static needs --static-config"))
		}
	case "kubernetes":
	default:
		errs = append(errs, fmt.Errorf("--discovery=%q: want kubernetes or static", c.Discovery))
	}
	if c.IdentityURL != "" {
		if c.Discovery != "kubernetes" {
			errs = append(errs, errors.New("--identity-url needs --discovery=kubernetes"))
		}
		if ns, name, ok := strings.Cut(c.TrustBundle, "/"); !ok || ns == "" || name == "" {
			errs = append(errs, fmt.Errorf("--trust-bundle=%q: want <namespace>/<configmap>", c.TrustBundle))
		}
		if c.TrustDomain == "" {
			errs = append(errs, errors.New("--identity-url needs --trust-domain"))
		}
	}
	return errors.Join(errs...)
}

// DefaultIdentityTokenFile is where the webhook projects the identity token.
const DefaultIdentityTokenFile = "/var/run/secrets/kubernetes.io/serviceaccount/podipc-identity-token"

// withPort returns addr with port unless it already has one.
func withPort(addr string, port int) string {
	if _, _, err := net.SplitHostPort(addr); err == nil {
		return addr
	}
	return net.JoinHostPort(addr, strconv.Itoa(port))
}

// host returns the host part of addr.
func host(addr string) string {
	if h, _, err := net.SplitHostPort(addr); err == nil {
		return h
	}
	return addr
}

// parseMemory reads --memory-limit and --memory-budget and derives the budget.
func (c *Config) parseMemory() error {
	parse := func(name, v string) (int64, error) {
		if v == "" {
			return 0, nil
		}
		q, err := resource.ParseQuantity(v)
		if err != nil || q.Sign() < 0 {
			return 0, fmt.Errorf("%s=%q: want a size in bytes or a quantity such as 64Mi", name, v)
		}
		return q.Value(), nil
	}
	var err error
	if c.MemoryLimit, err = parse("--memory-limit", c.memoryLimitFlag); err != nil {
		return err
	}
	if c.MemoryBudget, err = parse("--memory-budget", c.memoryBudgetFlag); err != nil {
		return err
	}
	if c.memoryBudgetFlag == "" {
		c.MemoryBudget = c.MemoryLimit * MemoryBudgetPercent / 100
	}
	switch {
	case c.MemoryBudget > 0 && c.MemoryBudget < MinMemoryBudget:
		return fmt.Errorf("memory budget %d bytes (--memory-budget, or half of --memory-limit): want at least %d", c.MemoryBudget, MinMemoryBudget)
	case c.MemoryLimit > 0 && c.MemoryBudget > c.MemoryLimit:
		return fmt.Errorf("--memory-budget=%s is more than --memory-limit=%s", c.memoryBudgetFlag, c.memoryLimitFlag)
	}
	return nil
}

// SoftMemoryLimit returns the Go runtime soft limit for the memory limit (0: none).
func (c Config) SoftMemoryLimit() int64 { return c.MemoryLimit * SoftLimitPercent / 100 }
