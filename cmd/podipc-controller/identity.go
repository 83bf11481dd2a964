package main

import (
	"flag"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/clock"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/podipc/podipc/pkg/certs"
	"github.com/podipc/podipc/pkg/channel"
	"github.com/podipc/podipc/pkg/identity"
	"github.com/podipc/podipc/pkg/identity/issuer"
	"github.com/podipc/podipc/pkg/inject"
	"github.com/podipc/podipc/pkg/seal"
)

// identityOptions are the identity endpoint's flags.
type identityOptions struct {
	bindAddress, certExtraHosts         string
	serviceName, secret, trustConfigMap string
	trustDomain                         string
	servicePort                         int
	lifetime, propagationDelay          time.Duration
}

func (o *identityOptions) bindFlags(fs *flag.FlagSet) {
	fs.StringVar(&o.bindAddress, "identity-bind-address", ":9444", `Address of the identity endpoint (HTTPS) that issues sidecars their workload certificates; "0" turns workload identity off (sidecars are injected without it).`)
	fs.StringVar(&o.trustDomain, "trust-domain", identity.DefaultTrustDomain, "SPIFFE trust domain of workload certificates: spiffe://<trust-domain>/ns/<namespace>/sa/<service account>.")
	fs.DurationVar(&o.lifetime, "identity-lifetime", issuer.DefaultLifetime, "Lifetime of a workload certificate; sidecars renew at half of it.")
	fs.DurationVar(&o.propagationDelay, "identity-propagation-delay", 10*time.Minute, "How long a new identity root is in the published trust bundle before it signs; must exceed the sidecars' bundle refresh (30s) by a wide margin.")
	fs.StringVar(&o.serviceName, "identity-service", "podipc-identity", "Name of the identity endpoint's Service (its serving certificate's DNS names, and the URL injected sidecars call).")
	fs.IntVar(&o.servicePort, "identity-service-port", 443, "Port of the identity Service.")
	fs.StringVar(&o.secret, "identity-secret", "podipc-identity", "Name of the Secret holding the identity root and the endpoint's serving certificate.")
	fs.StringVar(&o.trustConfigMap, "identity-trust-configmap", "podipc-identity-trust", "Name of the ConfigMap, in the controller's namespace, where the trust bundle is published for sidecars.")
	fs.StringVar(&o.certExtraHosts, "identity-cert-extra-hosts", "", "Comma-separated DNS names or IP addresses the endpoint's serving certificate covers besides the Service's (the local demo: 127.0.0.1).")
}

// enabled reports whether workload identity is on.
func (o identityOptions) enabled() bool { return o.bindAddress != "0" }

// injectIdentity is what the webhook tells sidecars, or nil with identity off. url, if not
// empty, replaces the Service URL (the local demo, where sidecars run outside a cluster).
func (o identityOptions) injectIdentity(namespace string) *inject.Identity {
	if !o.enabled() {
		return nil
	}
	host := o.serviceName + "." + namespace + ".svc"
	return &inject.Identity{
		URL:         "https://" + net.JoinHostPort(host, strconv.Itoa(o.servicePort)),
		TrustDomain: o.trustDomain,
		TrustBundle: namespace + "/" + o.trustConfigMap,
	}
}

// setupIdentity adds the identity root's rotation (leader only), the Keypair that serves
// and signs with it, and the endpoint (every replica).
func setupIdentity(mgr ctrl.Manager, o identityOptions, namespace string, key *seal.Key) error {
	if !o.enabled() {
		ctrl.Log.Info("Workload identity is off (--identity-bind-address=0)")
		return nil
	}
	if namespace == "" {
		return fmt.Errorf("the controller's namespace is unknown: set POD_NAMESPACE or --namespace")
	}
	if o.lifetime < 10*time.Minute || o.propagationDelay < time.Minute {
		return fmt.Errorf("--identity-lifetime=%s must be at least 10m and --identity-propagation-delay=%s at least 1m", o.lifetime, o.propagationDelay)
	}
	svc := o.serviceName + "." + namespace
	hosts := []string{svc + ".svc", svc, o.serviceName, svc + ".svc.cluster.local"}
	for h := range strings.SplitSeq(o.certExtraHosts, ",") {
		if h = strings.TrimSpace(h); h != "" {
			hosts = append(hosts, h)
		}
	}
	policy := issuer.RootPolicy(hosts, o.propagationDelay)
	if err := issuer.ValidatePolicy(policy, o.lifetime); err != nil {
		return err
	}
	direct, err := client.New(mgr.GetConfig(), client.Options{Scheme: mgr.GetScheme(), Mapper: mgr.GetRESTMapper(), HTTPClient: mgr.GetHTTPClient()})
	if err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(mgr.GetConfig())
	if err != nil {
		return err
	}
	secret := types.NamespacedName{Namespace: namespace, Name: o.secret}
	kp := &certs.Keypair{Clientset: cs, Secret: secret}
	rotator := &certs.Rotator{
		Client: direct, Secret: secret, Policy: policy, CheckInterval: time.Minute, Clock: clock.RealClock{},
		Name:      "identity root",
		Publisher: &issuer.TrustBundle{Client: direct, ConfigMap: types.NamespacedName{Namespace: namespace, Name: o.trustConfigMap}},
	}
	srv := &issuer.Server{
		Addr: o.bindAddress, TrustDomain: o.trustDomain, Lifetime: o.lifetime, Keypair: kp,
		Reviewer: direct, Pods: mgr.GetCache(), APIReader: mgr.GetAPIReader(), ChannelsOf: channel.ChannelsOf,
		Log:     ctrl.Log.WithName("identity"),
		Metrics: issuer.NewMetrics(metrics.Registry),
	}
	if key != nil {
		srv.Admit = func(pod *corev1.Pod) error { return key.Check(pod, channel.ChannelsOf(pod)) }
	}
	if err := srv.Listen(); err != nil {
		return err
	}
	for _, err := range []error{mgr.Add(kp), mgr.Add(rotator), mgr.Add(srv)} {
		if err != nil {
			return err
		}
	}
	return mgr.AddReadyzCheck("identity-certificate", kp.Checker)
}
