// Command podipc-controller runs the Channel controller and the sidecar injection webhook
// under one manager with leader election, metrics and health probes.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"os"

	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	"sigs.k8s.io/controller-runtime/pkg/metrics/filters"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/pkg/channel"
	"github.com/podipc/podipc/pkg/seal"
)

// options are the command-line flags.
type options struct {
	metricsAddr, probeAddr  string
	leaderElect             bool
	leaderElectionNamespace string
	channelConcurrency      int
	serviceAccount          string
	webhook                 webhookOptions
	identity                identityOptions
	sealSecret              string
	requireSeal             bool
	metricsSecure           bool
}

func main() {
	var o options
	flag.StringVar(&o.metricsAddr, "metrics-bind-address", ":8080", "Address of the Prometheus /metrics endpoint; \"0\" disables it.")
	flag.BoolVar(&o.metricsSecure, "metrics-secure", true, "Serve /metrics over HTTPS, to callers the API server authenticates (TokenReview) and authorizes for GET /metrics (SubjectAccessReview); false serves plain HTTP to anyone.")
	flag.StringVar(&o.probeAddr, "health-probe-bind-address", ":8081", "Address of /healthz and /readyz.")
	flag.BoolVar(&o.leaderElect, "leader-elect", true, "Elect a leader, so that only one replica reconciles at a time.")
	flag.StringVar(&o.leaderElectionNamespace, "leader-election-namespace", "", "Namespace of the leader election Lease (default: the pod's own).")
	flag.IntVar(&o.channelConcurrency, "channel-concurrency", 4, "Channels reconciled at once.")
	flag.StringVar(&o.serviceAccount, "service-account", os.Getenv("POD_SERVICE_ACCOUNT"), "The controller's own service account (default $POD_SERVICE_ACCOUNT), in --namespace: it binds podipc-slice-writer to it in each Channel's namespace. Empty: it writes EndpointSlices with whatever cluster-wide rights it holds.")
	o.webhook.bindFlags(flag.CommandLine)
	o.identity.bindFlags(flag.CommandLine)
	flag.StringVar(&o.sealSecret, "seal-secret", "podipc-seal", "Name of the Secret, in the controller's namespace, holding the key of the seal the webhook puts on every injected pod.")
	flag.BoolVar(&o.requireSeal, "require-seal", true, "Publish as members, and issue identities to, only pods carrying a valid seal. Turn off only while pods injected by a release without seals are restarted.")
	zapOpts := zap.Options{}
	zapOpts.BindFlags(flag.CommandLine)
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&zapOpts)))

	if err := run(ctrl.SetupSignalHandler(), o); err != nil {
		ctrl.Log.Error(err, "Controller failed")
		os.Exit(1)
	}
}

func run(ctx context.Context, o options) error {
	scheme := runtime.NewScheme()
	if err := errors.Join(clientgoscheme.AddToScheme(scheme), podipcv1alpha1.AddToScheme(scheme)); err != nil {
		return err
	}
	webhookServer, keypair, err := webhookServer(o.webhook)
	if err != nil {
		return err
	}
	cfg := ctrl.GetConfigOrDie()
	if err := waitForAPIServer(ctx, cfg, o.probeAddr); err != nil {
		return err
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		WebhookServer:           webhookServer,
		Scheme:                  scheme,
		Cache:                   cache.Options{ByObject: channel.CacheByObject()},
		Metrics:                 metricsOptions(o),
		HealthProbeBindAddress:  o.probeAddr,
		LeaderElection:          o.leaderElect,
		LeaderElectionID:        "controller.podipc.dev",
		LeaderElectionNamespace: o.leaderElectionNamespace,
		// The manager releases the lease when it is stopped, so a new leader starts at once.
		// It exits when it loses the lease (the API server gone past the renew deadline):
		// the kubelet restarts it at once, and waitForAPIServer holds it until the API
		// server is back instead of exiting again into a growing restart back-off.
		LeaderElectionReleaseOnCancel: true,
	})
	if err != nil {
		return fmt.Errorf("creating the manager: %w", err)
	}
	key, err := loadSeal(ctx, mgr, o)
	if err != nil {
		return err
	}
	var required *seal.Key
	if o.requireSeal {
		required = key
	}
	if err := setupReconcilers(ctx, mgr, o, required); err != nil {
		return err
	}
	if err := setupWebhooks(mgr, o.webhook, o.identity.injectIdentity(o.webhook.namespace), key, keypair); err != nil {
		return err
	}
	if err := setupIdentity(mgr, o.identity, o.webhook.namespace, required); err != nil {
		return fmt.Errorf("setting up workload identity: %w", err)
	}
	if err := setupChecks(mgr); err != nil {
		return err
	}
	ctrl.Log.Info("Starting the manager")
	return mgr.Start(ctx)
}

// loadSeal reads (or, the first time, creates) the seal key, before the manager starts:
// the webhook cannot inject without it.
func loadSeal(ctx context.Context, mgr ctrl.Manager, o options) (*seal.Key, error) {
	if o.webhook.namespace == "" {
		return nil, fmt.Errorf("the controller's namespace is unknown: set POD_NAMESPACE or --namespace")
	}
	direct, err := client.New(mgr.GetConfig(), client.Options{Scheme: mgr.GetScheme(), Mapper: mgr.GetRESTMapper(), HTTPClient: mgr.GetHTTPClient()})
	if err != nil {
		return nil, err
	}
	key, err := seal.Load(ctx, direct, types.NamespacedName{Namespace: o.webhook.namespace, Name: o.sealSecret})
	if err != nil {
		return nil, fmt.Errorf("loading the seal key: %w", err)
	}
	return key, nil
}

func setupReconcilers(ctx context.Context, mgr ctrl.Manager, o options, key *seal.Key) error {
	r := &channel.Reconciler{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorder("podipc-controller"), Seal: key}
	if o.serviceAccount != "" {
		r.Self = &rbacv1.Subject{Kind: rbacv1.ServiceAccountKind, Name: o.serviceAccount, Namespace: o.webhook.namespace}
	} else {
		ctrl.Log.Info("No --service-account: EndpointSlices are written with the controller's cluster-wide rights, if it has them")
	}
	if err := r.SetupWithManager(ctx, mgr, o.channelConcurrency); err != nil {
		return fmt.Errorf("setting up the Channel controller: %w", err)
	}
	return nil
}

// metricsOptions serves /metrics behind authentication and authorization unless
// --metrics-secure=false, as kubebuilder's scaffold does, and never over HTTP/2.
func metricsOptions(o options) metricsserver.Options {
	opts := metricsserver.Options{BindAddress: o.metricsAddr, TLSOpts: []func(*tls.Config){disableHTTP2}}
	if o.metricsSecure {
		opts.SecureServing = true
		opts.FilterProvider = filters.WithAuthenticationAndAuthorization
	}
	return opts
}

// disableHTTP2 offers HTTP/1.1 only: HTTP/2's rapid-reset and stream-cancellation
// weaknesses (CVE-2023-44487, CVE-2023-39325) buy nothing for webhook and metrics traffic.
func disableHTTP2(c *tls.Config) { c.NextProtos = []string{"http/1.1"} }

func setupChecks(mgr ctrl.Manager) error {
	if err := mgr.AddHealthzCheck("ping", healthz.Ping); err != nil {
		return err
	}
	return mgr.AddReadyzCheck("ping", healthz.Ping)
}
