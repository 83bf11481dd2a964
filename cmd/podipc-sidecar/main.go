// Command podipc-sidecar is the podipc data plane of one pod: it serves the pod's
// channels to its apps and carries their lines to the other member pods.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"

	"github.com/go-logr/logr"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/discovery/kube"
	"github.com/podipc/podipc/pkg/identity"
	"github.com/podipc/podipc/pkg/sidecar"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "podipc-sidecar:", err)
		os.Exit(1)
	}
}

func run() error {
	cfg, err := sidecar.ParseConfig(os.Args[1:], os.Getenv)
	if err != nil {
		return err
	}
	log, err := newLogger(cfg.LogLevel)
	if err != nil {
		return err
	}
	setMemoryLimit(cfg, log)
	setMaxProcs(cfg, log)
	source, reload, err := newSource(cfg, log)
	if err != nil {
		return err
	}
	ctx := signalContext(log, reload)
	sc, err := sidecar.New(cfg, source, log)
	if err != nil {
		return err
	}
	if cfg.IdentityURL != "" {
		c, err := newIdentity(cfg, log)
		if err != nil {
			return err
		}
		sc.WithIdentity(c)
	}
	return sc.Start(ctx)
}

// setMemoryLimit sets the Go runtime's soft memory limit below the container's limit
// (docs/design.md §8.7), unless GOMEMLIMIT says otherwise.
func setMemoryLimit(cfg sidecar.Config, log logr.Logger) {
	soft := cfg.SoftMemoryLimit()
	if os.Getenv("GOMEMLIMIT") != "" || soft <= 0 {
		return
	}
	debug.SetMemoryLimit(soft)
	log.Info("Memory limit", "limitBytes", cfg.MemoryLimit, "softLimitBytes", soft, "budgetBytes", cfg.MemoryBudget)
}

// setMaxProcs sets GOMAXPROCS to --max-procs (docs/design.md §8.8), unless GOMAXPROCS says
// otherwise or --max-procs is 0 (the runtime's own choice).
func setMaxProcs(cfg sidecar.Config, log logr.Logger) {
	if os.Getenv("GOMAXPROCS") == "" && cfg.MaxProcs > 0 {
		runtime.GOMAXPROCS(cfg.MaxProcs)
	}
	log.Info("Processors", "gomaxprocs", runtime.GOMAXPROCS(0), "cpus", runtime.NumCPU())
}

// newIdentity builds the workload certificate client: the trust bundle is read through
// the API server with the sidecar's own credentials.
func newIdentity(cfg sidecar.Config, log logr.Logger) (*identity.Client, error) {
	rc, err := restConfig(cfg.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("--identity-url: %w", err)
	}
	rc.UserAgent = "podipc-sidecar"
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	ns, name, _ := strings.Cut(cfg.TrustBundle, "/") // validated by ParseConfig
	return &identity.Client{
		URL: cfg.IdentityURL, TokenFile: cfg.IdentityTokenFile, TrustDomain: cfg.TrustDomain,
		Pod:           identity.Pod{Namespace: cfg.Namespace, Name: cfg.Name, UID: cfg.UID},
		Bundle:        identity.ConfigMapBundle{Client: dyn, Namespace: ns, Name: name},
		BundleRefresh: cfg.TrustBundleRefresh,
		Log:           log.WithName("identity"),
	}, nil
}

// newSource builds the discovery source the flags name.
func newSource(cfg sidecar.Config, log logr.Logger) (discovery.Source, func(), error) {
	switch cfg.Discovery {
	case "static":
		s := discovery.NewStatic(cfg.StaticConfig, cfg.Channels, log.WithName("discovery"))
		return s, s.Reload, nil
	case "kubernetes":
		rc, err := restConfig(cfg.Kubeconfig)
		if err != nil {
			return nil, nil, fmt.Errorf("--discovery=kubernetes: %w", err)
		}
		rc.UserAgent = "podipc-sidecar"
		s := &kube.Source{Config: rc, Namespace: cfg.Namespace, Channels: cfg.Channels, Log: log.WithName("discovery")}
		return s, nil, nil
	default:
		return nil, nil, fmt.Errorf("--discovery=%q: want kubernetes or static", cfg.Discovery)
	}
}

// restConfig reaches the API server: in a pod with the projected service-account token
// (in-cluster config); outside one (tests, local runs) with the kubeconfig named by
// --kubeconfig or $KUBECONFIG.
func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		return rest.InClusterConfig()
	}
	return clientcmd.BuildConfigFromFlags("", kubeconfig)
}

// signalContext is cancelled by the first SIGTERM or SIGINT; a second one exits at
// once. SIGHUP re-reads the static discovery file.
func signalContext(log logr.Logger, reload func()) context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	go func() {
		stopping := false
		for sig := range sigs {
			switch {
			case sig == syscall.SIGHUP:
				log.Info("Reloading discovery (SIGHUP)")
				if reload != nil {
					reload()
				}
			case stopping:
				log.Info("Second signal: exiting now", "signal", sig.String())
				os.Exit(1)
			default:
				log.Info("Shutting down", "signal", sig.String())
				stopping = true
				cancel()
			}
		}
	}()
	return ctx
}

// newLogger returns a JSON logr logger on stderr at the verbosity named by level.
func newLogger(level string) (logr.Logger, error) {
	v := 0
	switch level {
	case "info", "":
	case "debug":
		v = 1
	case "trace":
		v = 4
	default:
		n, err := strconv.Atoi(level)
		if err != nil {
			return logr.Logger{}, fmt.Errorf("--log-level=%q: want info, debug, trace or a number", level)
		}
		v = n
	}
	h := slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: slog.Level(-v)})
	return logr.FromSlogHandler(h), nil
}
