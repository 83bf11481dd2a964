package inject

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/recorder"
	"sigs.k8s.io/controller-runtime/pkg/source"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
)

// ConditionInjectionHealthy is the Channel condition the Monitor owns: False, with
// ReasonPodsNotInjected, while some pod that asked for injection and names the channel runs
// without the sidecar (the webhook was down under failurePolicy Ignore).
const ConditionInjectionHealthy = "InjectionHealthy"

// Reasons of ConditionInjectionHealthy, and of the pod Event.
const (
	ReasonPodsInjected    = "PodsInjected"
	ReasonPodsNotInjected = "PodsNotInjected"
	// ReasonInjectionMissing is the reason of the Warning Event on a pod that asked for the
	// sidecar and has none.
	ReasonInjectionMissing = "InjectionMissing"
)

// fieldOwner is the Monitor's server-side-apply identity. It applies only its own
// condition type to Channel status; since conditions is a listType=map keyed by type, the
// channel reconciler's conditions and counters are never touched, and neither writer can
// overwrite the other's.
const fieldOwner = "podipc-injection-monitor"

// Monitor is the injection monitor: a controller, not part of the webhook, that flags
// pods which asked for the sidecar and run without it. It lives in this package because
// its judgement, "the webhook would have injected this pod", is Decide's, the webhook's
// own truth table; a copy elsewhere could drift from what the webhook does. It watches
// pods through a metadata-only cache (the label and annotations are all it needs), reads the
// full pod with APIReader only for the rare candidate (to rule out hostNetwork), records a
// Warning Event on the pod once, and keeps ConditionInjectionHealthy on the Channels the pod
// names.
type Monitor struct {
	// Client is the manager's client: cached reads, server-side apply of Channel status.
	Client client.Client
	// APIReader reads a candidate pod's spec without caching every pod's spec.
	APIReader client.Reader
	// Recorder emits the InjectionMissing Event.
	Recorder recorder.EventRecorder
	// ControllerNamespace is never injected, so never flagged.
	ControllerNamespace string

	// reported holds the UIDs of pods already given an Event, so a pod's status updates do
	// not repeat it; a controller restart repeats it once, which is harmless.
	reported sync.Map
	// pods is this reconciler's own metadata-only cache of uninjected pods: the manager's
	// cache may select only injected pods (the channel reconciler's), which are the very
	// pods this one never needs.
	pods cache.Cache
	// flagged maps a flagged pod's key to the channels it named, so that its deletion, which
	// leaves nothing to read, still brings those Channels' condition back to True.
	flagged sync.Map
}

// +kubebuilder:rbac:groups="",resources=pods;namespaces,verbs=get;list;watch
// +kubebuilder:rbac:groups=podipc.dev,resources=channels,verbs=get;list;watch
// +kubebuilder:rbac:groups=podipc.dev,resources=channels/status,verbs=patch
// +kubebuilder:rbac:groups=events.k8s.io,resources=events,verbs=create;patch

// SetupWithManager watches the metadata of pods without the injected label, through a cache
// of its own selecting exactly those, and reconciles the ones that asked for the sidecar.
func (r *Monitor) SetupWithManager(mgr ctrl.Manager) error {
	uninjected, err := labels.NewRequirement(LabelInjected, selection.NotEquals, []string{"true"})
	if err != nil {
		return err
	}
	r.pods, err = cache.New(mgr.GetConfig(), cache.Options{
		Scheme: mgr.GetScheme(), Mapper: mgr.GetRESTMapper(), HTTPClient: mgr.GetHTTPClient(),
		ByObject: map[client.Object]cache.ByObject{&corev1.Pod{}: {
			Label: labels.NewSelector().Add(*uninjected), Transform: cache.TransformStripManagedFields(),
		}},
	})
	if err != nil {
		return err
	}
	if err := mgr.Add(r.pods); err != nil {
		return err
	}
	pod := &metav1.PartialObjectMetadata{}
	pod.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("Pod"))
	return ctrl.NewControllerManagedBy(mgr).
		Named("injection-monitor").
		WatchesRawSource(source.Kind(r.pods, pod, &handler.TypedEnqueueRequestForObject[*metav1.PartialObjectMetadata]{})).
		Complete(r)
}

// Reconcile flags one pod if it asked for the sidecar and has none.
func (r *Monitor) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	pod := &metav1.PartialObjectMetadata{}
	pod.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("Pod"))
	if err := r.pods.Get(ctx, req.NamespacedName, pod); err != nil {
		if !apierrors.IsNotFound(err) {
			return ctrl.Result{}, err
		}
		if names, ok := r.flagged.LoadAndDelete(req.NamespacedName); ok {
			return ctrl.Result{}, r.applyConditions(ctx, req.Namespace, names.([]string))
		}
		return ctrl.Result{}, nil
	}
	full, err := r.missing(ctx, pod)
	if err != nil || full == nil {
		return ctrl.Result{}, err
	}
	if _, seen := r.reported.LoadOrStore(pod.UID, true); !seen {
		ctrl.LoggerFrom(ctx).Info("Pod asked for the podipc sidecar but was admitted without it")
		r.Recorder.Eventf(full, nil, corev1.EventTypeWarning, ReasonInjectionMissing, "Admission",
			"Pod asked for the podipc sidecar (%s) but was admitted without it; the webhook was probably unavailable (failurePolicy Ignore). Recreate the pod once the podipc controller is healthy",
			SidecarName)
	}
	channels, _ := Channels(pod.Annotations[AnnotationChannels]) // invalid: the pod joins nothing
	r.flagged.Store(req.NamespacedName, channels)
	return ctrl.Result{}, r.applyConditions(ctx, pod.Namespace, channels)
}

// applyConditions recomputes ConditionInjectionHealthy on each named Channel.
func (r *Monitor) applyConditions(ctx context.Context, namespace string, channels []string) error {
	for _, name := range channels {
		if err := r.applyCondition(ctx, types.NamespacedName{Namespace: namespace, Name: name}); err != nil {
			return err
		}
	}
	return nil
}

// missing returns the full pod when it asked for the sidecar, the webhook would have
// injected it, and it has none; nil otherwise.
func (r *Monitor) missing(ctx context.Context, pod *metav1.PartialObjectMetadata) (*corev1.Pod, error) {
	if pod.Labels[LabelInjected] == "true" || !pod.DeletionTimestamp.IsZero() {
		return nil, nil
	}
	ns := &metav1.PartialObjectMetadata{}
	ns.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("Namespace"))
	if err := r.Client.Get(ctx, client.ObjectKey{Name: pod.Namespace}, ns); err != nil {
		return nil, client.IgnoreNotFound(err)
	}
	// A cheap first pass on metadata alone keeps the full GET for real candidates.
	if d, err := Decide(&corev1.Pod{ObjectMeta: pod.ObjectMeta}, pod.Namespace, ns.Labels, r.ControllerNamespace); err != nil || !d.Inject {
		return nil, nil //nolint:nilerr // a pod with invalid opt-in values was rejected or never asked
	}
	full := &corev1.Pod{}
	if err := r.APIReader.Get(ctx, client.ObjectKeyFromObject(pod), full); err != nil {
		return nil, client.IgnoreNotFound(err)
	}
	if d, err := Decide(full, full.Namespace, ns.Labels, r.ControllerNamespace); err != nil || !d.Inject {
		return nil, nil //nolint:nilerr // skipped on purpose (hostNetwork), or asked invalidly
	}
	return full, nil
}

// applyCondition recomputes ConditionInjectionHealthy of one Channel from the pods that name
// it, and applies it when the Channel exists.
func (r *Monitor) applyCondition(ctx context.Context, key types.NamespacedName) error {
	var channel podipcv1alpha1.Channel
	if err := r.Client.Get(ctx, key, &channel); err != nil {
		return client.IgnoreNotFound(err)
	}
	pods := &metav1.PartialObjectMetadataList{}
	pods.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("PodList"))
	if err := r.pods.List(ctx, pods, client.InNamespace(key.Namespace)); err != nil {
		return err
	}
	var notInjected []string
	for i := range pods.Items {
		p := &pods.Items[i]
		names, _ := Channels(p.Annotations[AnnotationChannels])
		if !slices.Contains(names, key.Name) {
			continue
		}
		full, err := r.missing(ctx, p)
		if err != nil {
			return err
		}
		if full != nil {
			notInjected = append(notInjected, p.Name)
		}
	}
	cond := metav1.Condition{
		Type: ConditionInjectionHealthy, Status: metav1.ConditionTrue, Reason: ReasonPodsInjected,
		Message: "Every pod that asked for the podipc sidecar has it", ObservedGeneration: channel.Generation,
	}
	if len(notInjected) > 0 {
		slices.Sort(notInjected)
		cond.Status, cond.Reason = metav1.ConditionFalse, ReasonPodsNotInjected
		cond.Message = fmt.Sprintf("%d pod(s) asked for the podipc sidecar but run without it: %s",
			len(notInjected), strings.Join(notInjected, ", "))
	}
	if old := meta.FindStatusCondition(channel.Status.Conditions, ConditionInjectionHealthy); old != nil &&
		old.Status == cond.Status && old.Reason == cond.Reason && old.Message == cond.Message {
		return nil
	}
	cond.LastTransitionTime = metav1.Now()
	return r.apply(ctx, key, cond)
}

// apply server-side-applies cond as the only field this reconciler owns on the Channel.
func (r *Monitor) apply(ctx context.Context, key types.NamespacedName, cond metav1.Condition) error {
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": podipcv1alpha1.GroupVersion.String(),
		"kind":       "Channel",
		"metadata":   map[string]any{"name": key.Name, "namespace": key.Namespace},
		"status": map[string]any{"conditions": []any{map[string]any{
			"type": cond.Type, "status": string(cond.Status), "reason": cond.Reason, "message": cond.Message,
			"observedGeneration": cond.ObservedGeneration, "lastTransitionTime": cond.LastTransitionTime.UTC().Format("2006-01-02T15:04:05Z"),
		}}},
	}}
	err := r.Client.Status().Apply(ctx, client.ApplyConfigurationFromUnstructured(u), client.FieldOwner(fieldOwner), client.ForceOwnership)
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}
