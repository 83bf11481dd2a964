// Command podipc-controller runs the Channel controller and the sidecar injection webhook
// under one manager with leader election, metrics and health probes.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/pkg/channel"
)

// options are the command-line flags.
type options struct {
	metricsAddr, probeAddr  string
	leaderElect             bool
	leaderElectionNamespace string
	channelConcurrency      int
	webhook                 webhookOptions
	identity                identityOptions
}

func main() {
	var o options
	flag.StringVar(&o.metricsAddr, "metrics-bind-address", ":8080", "Address of the Prometheus /metrics endpoint; \"0\" disables it.")
	flag.StringVar(&o.probeAddr, "health-probe-bind-address", ":8081", "Address of /healthz and /readyz.")
	flag.BoolVar(&o.leaderElect, "leader-elect", true, "Elect a leader, so that only one replica reconciles at a time.")
	flag.StringVar(&o.leaderElectionNamespace, "leader-election-namespace", "", "Namespace of the leader election Lease (default: the pod's own).")
	flag.IntVar(&o.channelConcurrency, "channel-concurrency", 4, "Channels reconciled at once.")
	o.webhook.bindFlags(flag.CommandLine)
	o.identity.bindFlags(flag.CommandLine)
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
	mgr, err := ctrl.NewManager(ctrl.GetConfigOrDie(), ctrl.Options{
		WebhookServer:           webhookServer,
		Scheme:                  scheme,
		Cache:                   cache.Options{ByObject: channel.CacheByObject()},
		Metrics:                 metricsserver.Options{BindAddress: o.metricsAddr},
		HealthProbeBindAddress:  o.probeAddr,
		LeaderElection:          o.leaderElect,
		LeaderElectionID:        "controller.podipc.dev",
		LeaderElectionNamespace: o.leaderElectionNamespace,
		// The manager exits right after losing the lease, so a new leader starts sooner.
		LeaderElectionReleaseOnCancel: true,
	})
	if err != nil {
		return fmt.Errorf("creating the manager: %w", err)
	}
	if err := setupReconcilers(ctx, mgr, o); err != nil {
		return err
	}
	if err := setupWebhooks(mgr, o.webhook, o.identity.injectIdentity(o.webhook.namespace), keypair); err != nil {
		return err
	}
	if err := setupIdentity(mgr, o.identity, o.webhook.namespace); err != nil {
		return fmt.Errorf("setting up workload identity: %w", err)
	}
	if err := setupChecks(mgr); err != nil {
		return err
	}
	ctrl.Log.Info("Starting the manager")
	return mgr.Start(ctx)
}

func setupReconcilers(ctx context.Context, mgr ctrl.Manager, o options) error {
	r := &channel.Reconciler{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorder("podipc-controller")}
	if err := r.SetupWithManager(ctx, mgr, o.channelConcurrency); err != nil {
		return fmt.Errorf("setting up the Channel controller: %w", err)
	}
	return nil
}

func setupChecks(mgr ctrl.Manager) error {
	if err := mgr.AddHealthzCheck("ping", healthz.Ping); err != nil {
		return err
	}
	return mgr.AddReadyzCheck("ping", healthz.Ping)
}
