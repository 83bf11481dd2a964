package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/clock"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/webhook"

	"github.com/podipc/podipc/pkg/certs"
	"github.com/podipc/podipc/pkg/inject"
	"github.com/podipc/podipc/pkg/peertls"
	"github.com/podipc/podipc/pkg/seal"
)

// webhookOptions are the injector's flags.
type webhookOptions struct {
	port                                          int
	host, certExtraHosts                          string
	certMode, certDir                             string
	namespace, configName, serviceName, secret    string
	image, pullPolicy                             string
	cpuRequest, cpuLimit, memoryRequest, memLimit string
	peerTLS                                       string
	maxProcs                                      int
}

func (o *webhookOptions) bindFlags(fs *flag.FlagSet) {
	fs.IntVar(&o.port, "webhook-port", 9443, "Port of the admission webhook server.")
	fs.StringVar(&o.host, "webhook-host", "", "Address the webhook server binds (default: every interface).")
	fs.StringVar(&o.certExtraHosts, "webhook-cert-extra-hosts", "", "Comma-separated DNS names or IP addresses the self-managed serving certificate covers besides the Service's, for an API server that calls the webhook by URL (the local demo: 127.0.0.1).")
	fs.StringVar(&o.certMode, "cert-mode", "self", `Webhook serving certificate: "self" (the controller manages CA, Secret and caBundle, rotating with overlap) or "cert-manager" (serve from --webhook-cert-dir; cert-manager's cainjector owns caBundle).`)
	fs.StringVar(&o.certDir, "webhook-cert-dir", "/tmp/k8s-webhook-server/serving-certs", "Directory of tls.crt and tls.key in cert-manager mode.")
	fs.StringVar(&o.namespace, "namespace", os.Getenv("POD_NAMESPACE"), "The controller's namespace (default $POD_NAMESPACE): holds the webhook Secret and Service, and is never injected.")
	fs.StringVar(&o.configName, "webhook-config-name", "podipc-injector", "Name of the MutatingWebhookConfiguration whose caBundle the controller manages.")
	fs.StringVar(&o.serviceName, "webhook-service", "podipc-webhook", "Name of the webhook Service (the serving certificate's DNS names).")
	fs.StringVar(&o.secret, "webhook-secret", "podipc-webhook-tls", "Name of the Secret holding the webhook CA and serving certificate.")
	fs.StringVar(&o.image, "sidecar-image", "ghcr.io/podipc/podipc-sidecar:latest", "Image of the injected podipc-sidecar.")
	fs.StringVar(&o.pullPolicy, "sidecar-pull-policy", "IfNotPresent", "Image pull policy of the injected sidecar.")
	fs.StringVar(&o.cpuRequest, "sidecar-cpu-request", "50m", "Default CPU request of the sidecar (pods override it with podipc.dev/sidecar-cpu-request); empty for none.")
	fs.StringVar(&o.cpuLimit, "sidecar-cpu-limit", "", "Default CPU limit of the sidecar; empty for none.")
	fs.StringVar(&o.memoryRequest, "sidecar-memory-request", "32Mi", "Default memory request of the sidecar; empty for none.")
	fs.StringVar(&o.memLimit, "sidecar-memory-limit", "128Mi", "Default memory limit of the sidecar; empty for none.")
	fs.IntVar(&o.maxProcs, "sidecar-max-procs", 1, "GOMAXPROCS of every injected sidecar (its $PODIPC_MAX_PROCS; pods override it with podipc.dev/sidecar-max-procs); 0 leaves the Go runtime's choice, the CPU limit or else every CPU of the node.")
	fs.StringVar(&o.peerTLS, "peer-tls", string(peertls.Required), "Peer TLS mode of every injected sidecar (its $PODIPC_PEER_TLS): Required, Permissive (also plaintext peers, while a cluster upgrades) or Disabled. Required and Permissive need workload identity; a pod may only make it stricter (podipc.dev/peer-tls).")
}

// webhookServer builds the manager's webhook server; in self mode its certificate comes from
// the returned Keypair, which setupWebhooks adds to the manager.
func webhookServer(o webhookOptions) (webhook.Server, *certs.Keypair, error) {
	opts := webhook.Options{Host: o.host, Port: o.port, CertDir: o.certDir, TLSOpts: []func(*tls.Config){disableHTTP2}}
	switch o.certMode {
	case "cert-manager":
		return webhook.NewServer(opts), nil, nil
	case "self":
	default:
		return nil, nil, fmt.Errorf("--cert-mode=%q: want \"self\" or \"cert-manager\"", o.certMode)
	}
	if o.namespace == "" {
		return nil, nil, fmt.Errorf("the controller's namespace is unknown: set POD_NAMESPACE or --namespace")
	}
	cs, err := kubernetes.NewForConfig(ctrl.GetConfigOrDie())
	if err != nil {
		return nil, nil, err
	}
	kp := &certs.Keypair{Clientset: cs, Secret: types.NamespacedName{Namespace: o.namespace, Name: o.secret}}
	opts.TLSOpts = append(opts.TLSOpts, kp.TLSOption)
	return webhook.NewServer(opts), kp, nil
}

// setupWebhooks registers the sidecar injection webhook, the monitor of pods it missed and,
// in self mode, the certificate rotation (leader only) and loading (every replica).
func setupWebhooks(mgr ctrl.Manager, o webhookOptions, id *inject.Identity, key *seal.Key, kp *certs.Keypair) error {
	cfg, err := o.injectConfig()
	if err != nil {
		return err
	}
	cfg.Identity, cfg.Seal = id, key
	if cfg.PeerTLS, err = peerTLSMode(o.peerTLS, id != nil); err != nil {
		return err
	}
	hook := &inject.Webhook{Reader: mgr.GetCache(), APIReader: mgr.GetAPIReader(), Config: cfg}
	if err := hook.SetupWithManager(mgr); err != nil {
		return fmt.Errorf("setting up the injection webhook: %w", err)
	}
	monitor := &inject.Monitor{
		Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(),
		Recorder: mgr.GetEventRecorder("podipc-injection-monitor"), ControllerNamespace: o.namespace,
	}
	if err := monitor.SetupWithManager(mgr); err != nil {
		return fmt.Errorf("setting up the injection monitor: %w", err)
	}
	if kp == nil {
		return mgr.AddReadyzCheck("webhook", mgr.GetWebhookServer().StartedChecker())
	}
	// Uncached: a cached client would watch every Secret in the cluster for the one it needs.
	direct, err := client.New(mgr.GetConfig(), client.Options{Scheme: mgr.GetScheme(), Mapper: mgr.GetRESTMapper(), HTTPClient: mgr.GetHTTPClient()})
	if err != nil {
		return err
	}
	svc := o.serviceName + "." + o.namespace
	hosts := []string{svc + ".svc", svc, o.serviceName, svc + ".svc.cluster.local"}
	for h := range strings.SplitSeq(o.certExtraHosts, ",") {
		if h = strings.TrimSpace(h); h != "" {
			hosts = append(hosts, h)
		}
	}
	rotator := &certs.Rotator{
		Client:        direct,
		Secret:        kp.Secret,
		WebhookConfig: o.configName,
		Policy:        certs.DefaultPolicy(hosts),
		CheckInterval: time.Minute,
		Clock:         clock.RealClock{},
	}
	if err := rotator.Policy.Validate(); err != nil {
		return err
	}
	if err := mgr.Add(kp); err != nil {
		return err
	}
	if err := mgr.Add(rotator); err != nil {
		return err
	}
	return mgr.AddReadyzCheck("webhook-certificate", kp.Checker)
}

// injectConfig turns the sidecar flags into inject.Config.
func (o webhookOptions) injectConfig() (inject.Config, error) {
	cfg := inject.Config{Image: o.image, PullPolicy: corev1.PullPolicy(o.pullPolicy), ControllerNamespace: o.namespace, MaxProcs: o.maxProcs}
	if o.maxProcs < 0 {
		return cfg, fmt.Errorf("--sidecar-max-procs=%d: want 0 or more", o.maxProcs)
	}
	for _, q := range []struct {
		flag, value string
		list        *corev1.ResourceList
		name        corev1.ResourceName
	}{
		{"sidecar-cpu-request", o.cpuRequest, &cfg.Resources.Requests, corev1.ResourceCPU},
		{"sidecar-cpu-limit", o.cpuLimit, &cfg.Resources.Limits, corev1.ResourceCPU},
		{"sidecar-memory-request", o.memoryRequest, &cfg.Resources.Requests, corev1.ResourceMemory},
		{"sidecar-memory-limit", o.memLimit, &cfg.Resources.Limits, corev1.ResourceMemory},
	} {
		if q.value == "" {
			continue
		}
		v, err := resource.ParseQuantity(q.value)
		if err != nil {
			return cfg, fmt.Errorf("--%s=%q: %w", q.flag, q.value, err)
		}
		if *q.list == nil {
			*q.list = corev1.ResourceList{}
		}
		(*q.list)[q.name] = v
	}
	return cfg, nil
}

// peerTLSMode parses --peer-tls, which needs workload identity unless it is Disabled: an
// injected sidecar without a certificate cannot speak TLS.
func peerTLSMode(flag string, identity bool) (peertls.Mode, error) {
	m, err := peertls.ParseMode(flag)
	if err != nil {
		return "", fmt.Errorf("--peer-tls=%w", err)
	}
	if m != peertls.Disabled && !identity {
		return "", fmt.Errorf("--peer-tls=%s needs workload identity, which --identity-bind-address=0 turns off: "+
			"set --peer-tls=Disabled for plaintext peer links", m)
	}
	ctrl.Log.Info("Injected sidecars' peer links", "peerTLS", m)
	return m, nil
}
