// Package testenv starts the test control plane — a real kube-apiserver and etcd, built
// from source by hack/k8s/build.sh into bin/k8s/<version>/ — with podipc's CRDs
// installed, for integration tests of the controller, the webhook and the sidecar's
// Kubernetes discovery.
//
// Start it once per test package, from TestMain:
//
//	var env *testenv.Env
//
//	func TestMain(m *testing.M) { testenv.Main(m, &env) }
//
// A package that needs more — a manager running its controllers or webhook, a kubeconfig
// file for a command under test, the webhook configurations installed, no CRDs — says so
// with setup functions (see Env.StartManager and Env.WriteKubeconfig) and Options
// (WithWebhooks, WithoutCRDs) passed to MainWith.
//
// The binaries are looked up in $KUBEBUILDER_ASSETS, then in the repository's
// bin/k8s/<KubeVersion>/. If they are missing the package FAILS (it never skips): a green
// run must mean the integration tests ran. `make control-plane` builds them.
package testenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	apiruntime "k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/internal/podnet"
)

// KubeVersion is the Kubernetes version of the test control plane; it matches
// KUBE_VERSION in the Makefile and hack/k8s/build.sh.
const KubeVersion = "v1.37.2"

// PodCIDR is the range of pod IPs inside the network EnterPodNetwork sets up: every
// address in it is local, so a test can run one sidecar per pod IP on one machine. Tests
// must not give a pod podnet.NodeIP, which the API server advertises there.
const PodCIDR = podnet.CIDR

// Env is a running test control plane.
type Env struct {
	// Environment is the underlying envtest environment; its ControlPlane gives access
	// to the API server and etcd processes.
	Environment *envtest.Environment
	// Config reaches the API server as a cluster admin.
	Config *rest.Config
	// Scheme knows the built-in kinds and podipc's.
	Scheme *apiruntime.Scheme
	// Client is an uncached admin client, for arranging and asserting in tests.
	Client client.Client
	// Dir is a scratch directory that lives as long as the control plane: Stop removes
	// it. The API server's certificates are kept in it too.
	Dir string
}

// Option adjusts the envtest environment before it starts.
type Option func(*envtest.Environment)

// WithWebhooks installs the webhook configurations of config/webhook, rewritten by envtest
// to call a local webhook server: serve it from the host, port and certificate directory
// in Env.Environment.WebhookInstallOptions.
func WithWebhooks() Option {
	return func(te *envtest.Environment) {
		te.WebhookInstallOptions.Paths = []string{filepath.Join(RepoRoot(), "config", "webhook")}
	}
}

// WithoutCRDs starts the control plane without podipc's CRDs, for tests of what installs
// them (the Helm chart).
func WithoutCRDs() Option {
	return func(te *envtest.Environment) {
		te.CRDDirectoryPaths = nil
		te.ErrorIfCRDPathMissing = false
	}
}

// RepoRoot returns the repository root, found from this source file.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// AssetsDir returns the directory holding kube-apiserver and etcd, or an error telling
// how to build them.
func AssetsDir() (string, error) {
	dir := os.Getenv("KUBEBUILDER_ASSETS")
	source := "KUBEBUILDER_ASSETS"
	if dir == "" {
		dir = filepath.Join(RepoRoot(), "bin", "k8s", KubeVersion)
		source = "the repository's bin path"
	}
	var missing []string
	for _, name := range []string{"kube-apiserver", "etcd"} {
		if fi, err := os.Stat(filepath.Join(dir, name)); err != nil || fi.IsDir() {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		return "", fmt.Errorf("test control plane missing: %v not found in %s (from %s); run 'make control-plane' (or 'make test', which builds it first)", missing, dir, source)
	}
	return dir, nil
}

// Start starts a control plane with podipc's CRDs installed and waits until it serves.
func Start(opts ...Option) (*Env, error) {
	assets, err := AssetsDir()
	if err != nil {
		return nil, err
	}
	scheme := apiruntime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return nil, err
	}
	if err := podipcv1alpha1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "podipc-testenv-")
	if err != nil {
		return nil, err
	}
	// A fixed certificate directory makes the API server restartable with the same
	// serving CA and port: envtest regenerates both for a directory it allocated itself,
	// which would leave every existing client unable to reconnect (see RestartAPIServer).
	certDir := filepath.Join(dir, "apiserver")
	if err := os.Mkdir(certDir, 0o700); err != nil {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	te := &envtest.Environment{
		BinaryAssetsDirectory:    assets,
		CRDDirectoryPaths:        []string{filepath.Join(RepoRoot(), "config", "crd", "bases")},
		ErrorIfCRDPathMissing:    true,
		Scheme:                   scheme,
		ControlPlaneStartTimeout: 2 * time.Minute, // a busy 2-core machine
		// kube-apiserver can linger on open watches when stopped under load; after this
		// long it is killed (see RestartAPIServer).
		ControlPlaneStopTimeout: 10 * time.Second,
	}
	te.ControlPlane.APIServer = &envtest.APIServer{CertDir: certDir}
	if podnet.Inside() {
		te.ControlPlane.APIServer.Configure().Set("advertise-address", podnet.NodeIP)
	}
	for _, o := range opts {
		o(te)
	}
	cfg, err := te.Start()
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("starting the test control plane from %s: %w", assets, err)
	}
	cfg.QPS, cfg.Burst = 1000, 2000 // tests create hundreds of objects
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		return nil, errors.Join(err, te.Stop(), os.RemoveAll(dir))
	}
	return &Env{Environment: te, Config: cfg, Scheme: scheme, Client: c, Dir: dir}, nil
}

// Stop stops the control plane and removes its files.
func (e *Env) Stop() error {
	err := e.Environment.Stop()
	return errors.Join(err, os.RemoveAll(e.Dir))
}

// WriteKubeconfig adds a cluster admin (group system:masters) named user to the API
// server and writes a kubeconfig file for it into dir, for a command under test that
// reads one (--kubeconfig). It returns the file's path.
func (e *Env) WriteKubeconfig(dir, user string) (string, error) {
	u, err := e.Environment.ControlPlane.AddUser(envtest.User{Name: user, Groups: []string{"system:masters"}}, nil)
	if err != nil {
		return "", fmt.Errorf("adding user %s: %w", user, err)
	}
	raw, err := u.KubeConfig()
	if err != nil {
		return "", fmt.Errorf("kubeconfig of user %s: %w", user, err)
	}
	path := filepath.Join(dir, user+".kubeconfig")
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		return "", err
	}
	return path, nil
}

// StartManager builds a manager on the control plane with opts (the Scheme defaults to
// e.Scheme; metrics serving is always off, so packages never race for a port), lets setup
// add controllers and webhooks to it, starts it and waits until its cache has synced.
// setup's context is the manager's: it ends when stop is called. stop cancels the manager
// and waits for it to return, so no controller outlives the test control plane.
func (e *Env) StartManager(opts ctrl.Options, setup func(ctx context.Context, mgr ctrl.Manager) error) (stop func(), err error) {
	return e.StartManagerAs(e.Config, opts, setup)
}

// StartManagerAs is StartManager with the manager talking to the API server as cfg says
// (e.g. Impersonate, to run a controller with only the rights its RBAC grants).
func (e *Env) StartManagerAs(cfg *rest.Config, opts ctrl.Options, setup func(ctx context.Context, mgr ctrl.Manager) error) (stop func(), err error) {
	if opts.Scheme == nil {
		opts.Scheme = e.Scheme
	}
	opts.Metrics = metricsserver.Options{BindAddress: "0"}
	mgr, err := ctrl.NewManager(cfg, opts)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := setup(ctx, mgr); err != nil {
		cancel()
		return nil, err
	}
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	stop = func() {
		cancel()
		if err := <-done; err != nil {
			fmt.Fprintf(os.Stderr, "manager: %v\n", err)
		}
	}
	synced := make(chan bool, 1)
	go func() { synced <- mgr.GetCache().WaitForCacheSync(ctx) }()
	select {
	case err := <-done:
		// The manager failed to start (a webhook port in use, a bad cache option); the
		// waiting goroutine above returns once ctx is cancelled.
		cancel()
		return nil, fmt.Errorf("manager stopped while starting: %w", err)
	case ok := <-synced:
		if !ok {
			stop()
			return nil, errors.New("the manager's cache did not sync")
		}
	}
	return stop, nil
}

// As returns a copy of the admin config that impersonates the service account ns/name,
// with the groups the API server gives every service account.
func (e *Env) As(ns, name string) *rest.Config {
	cfg := rest.CopyConfig(e.Config)
	cfg.Impersonate = rest.ImpersonationConfig{
		UserName: "system:serviceaccount:" + ns + ":" + name,
		Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"},
	}
	return cfg
}

// RestartAPIServer stops the API server and starts it again on the same address, with
// the same certificates, over the same etcd: clients see a connection outage, not a new
// cluster. down runs while the API server is stopped. An API server that does not stop
// on SIGTERM in time (it can wait on open watches) is killed, which is an outage too.
func (e *Env) RestartAPIServer(down func()) error {
	apiServer := e.Environment.ControlPlane.GetAPIServer()
	if err := apiServer.Stop(); err != nil && !strings.Contains(err.Error(), "timeout waiting for process") {
		return fmt.Errorf("stopping the API server: %w", err)
	}
	if down != nil {
		down()
	}
	if err := apiServer.Start(); err != nil {
		return fmt.Errorf("starting the API server again: %w", err)
	}
	return nil
}

// Main starts the control plane into *env, runs setup (if any; e.g. to start a manager,
// returning its stop function, which may be nil), runs the package's tests and stops it
// all, in reverse order. A control plane or setup that cannot start makes the package
// fail with the reason.
func Main(m *testing.M, env **Env, setup ...func(*Env) (stop func(), err error)) {
	MainWith(m, env, nil, setup...)
}

// MainWith is Main for a control plane started with opts.
func MainWith(m *testing.M, env **Env, opts []Option, setup ...func(*Env) (stop func(), err error)) {
	e, err := Start(opts...)
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: %v\n", err)
		os.Exit(1)
	}
	*env = e
	var stops []func()
	code := 1
	for _, s := range setup {
		stop, err := s(e)
		if err != nil {
			fmt.Fprintf(os.Stderr, "FAIL: test setup: %v\n", err)
			break
		}
		stops = append(stops, stop)
	}
	if len(stops) == len(setup) {
		code = m.Run()
	}
	for _, stop := range slices.Backward(stops) {
		if stop != nil {
			stop()
		}
	}
	if err := e.Stop(); err != nil {
		fmt.Fprintf(os.Stderr, "stopping the test control plane: %v\n", err)
	}
	os.Exit(code)
}
