package cli

import (
	"context"
	"fmt"
	"net"
	"strconv"

	"github.com/spf13/pflag"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// channelResource is the Channel kind's REST resource. The CLI reads Channels as
// unstructured objects: it needs one field and stays usable against newer API versions.
var channelResource = schema.GroupVersionResource{Group: "podipc.dev", Version: "v1alpha1", Resource: "channels"}

// defaultLocalPort is Channel.spec.localPort's schema default.
const defaultLocalPort = 7000

// kubeOptions are the kubectl-style flags of the commands that reach the API server.
type kubeOptions struct {
	kubeconfig string
	context    string
	namespace  string
}

func (o *kubeOptions) addFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "path to the kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or the in-cluster service account)")
	fs.StringVar(&o.context, "context", "", "kubeconfig context to use")
	fs.StringVarP(&o.namespace, "namespace", "n", "", "namespace of the channel (default: the context's namespace)")
}

// config returns a REST config and the namespace to work in, resolved like kubectl does.
func (o *kubeOptions) config(streams Streams) (*rest.Config, string, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = o.kubeconfig
	overrides := &clientcmd.ConfigOverrides{CurrentContext: o.context}
	overrides.Context.Namespace = o.namespace
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, overrides)
	cfg, err := cc.ClientConfig()
	if err != nil {
		return nil, "", fmt.Errorf("loading kubeconfig: %w", err)
	}
	ns, _, err := cc.Namespace()
	if err != nil {
		return nil, "", fmt.Errorf("resolving the namespace: %w", err)
	}
	// Admission warnings (the injector explains every skip in one) reach the user.
	cfg.WarningHandler = rest.NewWarningWriter(streams.Err, rest.WarningWriterOptions{Deduplicate: true})
	cfg.UserAgent = "podipc-cli"
	return cfg, ns, nil
}

func (o *kubeOptions) clientset(streams Streams) (kubernetes.Interface, string, error) {
	cfg, ns, err := o.config(streams)
	if err != nil {
		return nil, "", err
	}
	cs, err := kubernetes.NewForConfig(cfg)
	return cs, ns, err
}

// channelPort reads Channel.spec.localPort of the named Channel.
func (o *kubeOptions) channelPort(ctx context.Context, streams Streams, name string) (int, error) {
	cfg, ns, err := o.config(streams)
	if err != nil {
		return 0, err
	}
	dc, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return 0, err
	}
	ch, err := dc.Resource(channelResource).Namespace(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return 0, fmt.Errorf("reading Channel %s/%s: %w", ns, name, err)
	}
	port, found, err := unstructured.NestedInt64(ch.Object, "spec", "localPort")
	if err != nil {
		return 0, fmt.Errorf("reading Channel %s/%s: spec.localPort: %w", ns, name, err)
	}
	if !found {
		return defaultLocalPort, nil
	}
	return int(port), nil
}

// endpointOptions are the flags saying where the sidecar's line port is.
type endpointOptions struct {
	kube    kubeOptions
	port    int
	address string
	// pod is the member pod to port-forward into (--pod).
	pod string
}

func (o *endpointOptions) addFlags(fs *pflag.FlagSet) {
	fs.IntVar(&o.port, "port", 0, "the channel's local port (skips the Channel lookup); with --pod, that port of the pod")
	fs.StringVar(&o.address, "address", "127.0.0.1", "address of the sidecar's line port on this machine (the sidecar's --app-address)")
	fs.StringVar(&o.pod, "pod", "", "member pod to reach the channel through (default: a ready member)")
	o.kube.addFlags(fs)
}

// resolve returns host:port for the channel named, or numbered, by target: --port wins,
// then a numeric target, then the Channel's spec.localPort read through the kubeconfig.
func (o *endpointOptions) resolve(ctx context.Context, streams Streams, target string) (string, error) {
	port := o.port
	switch {
	case port != 0:
	case target == "":
		return "", fmt.Errorf("name a channel or a port, or pass --port")
	default:
		if n, err := strconv.Atoi(target); err == nil {
			port = n
		} else if port, err = o.kube.channelPort(ctx, streams, target); err != nil {
			return "", err
		}
	}
	if port < 1 || port > 65535 {
		return "", fmt.Errorf("port %d out of range 1-65535", port)
	}
	return net.JoinHostPort(o.address, strconv.Itoa(port)), nil
}
