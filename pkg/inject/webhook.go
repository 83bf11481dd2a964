package inject

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/klog/v2"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/pkg/seal"
)

// Path is where the manager's webhook server serves the injector; the
// MutatingWebhookConfiguration in config/webhook points at it.
const Path = "/inject-v1-pod"

// Webhook injects the podipc sidecar into pods at CREATE. It is a typed
// admission.Defaulter[*corev1.Pod]; Handler adds the skip warnings to the response.
type Webhook struct {
	// Reader reads namespaces and Channels; it is the manager's cache, so admission never
	// makes a request to the API server.
	Reader client.Reader
	// APIReader reads a namespace the cache does not have yet (a pod created right after its
	// namespace); without it such a pod would be denied.
	APIReader client.Reader
	// Config describes the sidecar to inject.
	Config Config
}

var _ admission.Defaulter[*corev1.Pod] = &Webhook{}

// SetupWithManager registers the webhook on the manager's webhook server. The manager's
// cache must be able to read namespaces' metadata and Channels.
func (w *Webhook) SetupWithManager(mgr ctrl.Manager) error {
	mgr.GetWebhookServer().Register(Path, w.Handler(mgr.GetScheme()))
	return nil
}

// Handler is the admission handler: the typed defaulter, plus the admission warnings that
// Default collected (the Defaulter interface has no way to return them).
func (w *Webhook) Handler(scheme *runtime.Scheme) *admission.Webhook {
	hook := admission.WithDefaulter[*corev1.Pod](scheme, w)
	inner := hook.Handler
	hook.Handler = admission.HandlerFunc(func(ctx context.Context, req admission.Request) admission.Response {
		c := &collector{}
		resp := inner.Handle(context.WithValue(ctx, warningsKey{}, c), req)
		return resp.WithWarnings(c.warnings...)
	})
	return hook
}

// Default decides and, when the pod is to be injected, injects it. An error denies the pod
// with its message.
func (w *Webhook) Default(ctx context.Context, pod *corev1.Pod) error {
	namespace := pod.Namespace
	if req, err := admission.RequestFromContext(ctx); err == nil && req.Namespace != "" {
		namespace = req.Namespace
	}
	ns := &metav1.PartialObjectMetadata{}
	ns.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("Namespace"))
	err := w.Reader.Get(ctx, client.ObjectKey{Name: namespace}, ns)
	if apierrors.IsNotFound(err) && w.APIReader != nil {
		err = w.APIReader.Get(ctx, client.ObjectKey{Name: namespace}, ns)
	}
	if err != nil {
		return fmt.Errorf("podipc: reading namespace %q: %w", namespace, err)
	}
	d, err := Decide(pod, namespace, ns.Labels, w.Config.ControllerNamespace)
	if err != nil {
		rejections.Inc()
		return err
	}
	if d.Skip != "" {
		skips.WithLabelValues(string(d.Skip)).Inc()
		warn(ctx, d.Warning())
		ctrl.LoggerFrom(ctx).V(4).Info("Skipped pod", "pod", klog.KObj(pod), "namespace", namespace, "reason", d.Skip)
	}
	if !d.Inject {
		return nil
	}
	if err := w.checkChannels(ctx, namespace, pod); err != nil {
		rejections.Inc()
		return err
	}
	if err := w.Config.Inject(pod); err != nil {
		rejections.Inc()
		return err
	}
	if w.Config.Seal != nil {
		channels, _ := Channels(pod.Annotations[AnnotationChannels]) // Inject validated them
		pod.Annotations = withAnnotation(pod.Annotations, seal.Annotation,
			w.Config.Seal.Sign(namespace, pod.Spec.ServiceAccountName, strings.Join(channels, ",")))
	}
	injections.Inc()
	return nil
}

func withAnnotation(a map[string]string, key, value string) map[string]string {
	if a == nil {
		a = map[string]string{}
	}
	a[key] = value
	return a
}

// checkChannels rejects a pod that names a Channel its service account may not join, and
// a pod whose Channels share a localPort. Channels that do not exist yet are not checked.
func (w *Webhook) checkChannels(ctx context.Context, namespace string, pod *corev1.Pod) error {
	names, err := Channels(pod.Annotations[AnnotationChannels])
	if err != nil {
		return err
	}
	if len(names) == 0 {
		return nil
	}
	var list podipcv1alpha1.ChannelList
	if err := w.Reader.List(ctx, &list, client.InNamespace(namespace)); err != nil {
		return fmt.Errorf("podipc: listing Channels in %q: %w", namespace, err)
	}
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	for i := range list.Items {
		ch := &list.Items[i]
		if slices.Contains(names, ch.Name) && !ch.Spec.Access.Allows(sa) {
			return fmt.Errorf("service account %q may not join Channel %q: its spec.access.serviceAccounts lists only %s; "+
				"run the pod as one of them or add %q to the Channel", sa, ch.Name, quoteJoin(ch.Spec.Access.ServiceAccounts), sa)
		}
	}
	return checkPorts(list.Items, names)
}

// checkPorts rejects a pod whose existing Channels share a localPort: the sidecar could serve
// only one of them on 127.0.0.1.
func checkPorts(channels []podipcv1alpha1.Channel, names []string) error {
	byPort := map[int32][]string{}
	for i := range channels {
		ch := &channels[i]
		if slices.Contains(names, ch.Name) {
			byPort[ch.Spec.LocalPort] = append(byPort[ch.Spec.LocalPort], ch.Name)
		}
	}
	for _, port := range slices.Sorted(maps.Keys(byPort)) {
		if clash := byPort[port]; len(clash) > 1 {
			slices.Sort(clash)
			return fmt.Errorf("channels %s share localPort %d: a pod can join only one Channel per local port",
				quoteJoin(clash), port)
		}
	}
	return nil
}

// quoteJoin renders names as `"a"`, `"a" and "b"` or `"a", "b" and "c"`.
func quoteJoin(names []string) string {
	if len(names) == 1 {
		return fmt.Sprintf("%q", names[0])
	}
	q := make([]string, len(names))
	for i, n := range names {
		q[i] = fmt.Sprintf("%q", n)
	}
	return strings.Join(q[:len(q)-1], ", ") + " and " + q[len(q)-1]
}

// warningsKey carries the collector of one admission request's warnings.
type warningsKey struct{}

// collector gathers admission warnings while Default runs.
type collector struct {
	mu       sync.Mutex
	warnings []string
}

// warn adds an admission warning to the current request, if Handler is serving it.
func warn(ctx context.Context, msg string) {
	if c, ok := ctx.Value(warningsKey{}).(*collector); ok && msg != "" {
		c.mu.Lock()
		c.warnings = append(c.warnings, msg)
		c.mu.Unlock()
	}
}
