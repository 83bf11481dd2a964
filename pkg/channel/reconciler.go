// Package channel is the controller of the Channel kind: it publishes each channel's
// member pods as EndpointSlices, grants the members' service accounts read access to
// their channels, and reports membership in the Channel's status.
//
// A pod is a member of a channel when its injected sidecar (the container named
// podipc-sidecar, a native sidecar in initContainers or a plain container) lists the
// channel in PODIPC_CHANNELS. Only pods labelled podipc.dev/injected=true are cached.
//
// Pods that name a channel that does not exist get a Warning Event (reason
// ChannelNotFound). This needs no second controller: a pod event is mapped onto the
// Channel it names, so the Channel's reconcile runs with the Channel absent and reports
// the pods that name it; once the Channel is created, its own watch reconciles it and the
// pods become members.
package channel

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/events"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/seal"
)

// PodChannelsIndex indexes cached pods by the channels their sidecar names.
const PodChannelsIndex = "podipc.dev/channels"

// ReasonChannelNotFound is the reason of the Event on a pod that names a missing channel.
const ReasonChannelNotFound = "ChannelNotFound"

// Reconciler keeps a Channel's EndpointSlices, RoleBinding and status in line with
// the pods that name it.
type Reconciler struct {
	// Client reads from the manager's cache and writes to the API server.
	Client client.Client
	// Recorder emits Events on pods that name a missing channel.
	Recorder events.EventRecorder
	// Seal, if set, is the key of the webhook's seal: a pod without a valid seal is never
	// a member (see package seal). Nil accepts unsealed pods (an upgrade from a release
	// without seals, until its pods are restarted).
	Seal *seal.Key
	// Self, if set, is the controller's own service account: it writes EndpointSlices
	// through a RoleBinding of SliceWriterRole to Self per Channel namespace. Nil assumes
	// the controller may write slices already (tests run as admin, older charts).
	Self *rbacv1.Subject

	// excludedMu guards excluded.
	excludedMu sync.Mutex
	// excluded holds, by pod UID and channel, the reason a pod was last logged and counted
	// as excluded, so a pod is reported once per reason rather than once per reconcile.
	excluded map[string]string

	// mu guards reported.
	mu sync.Mutex
	// reported holds, per missing channel, the pods already told so by an Event, so a
	// pod gets one Event per absence of its channel rather than one per reconcile.
	reported map[types.NamespacedName]map[types.UID]bool
}

// +kubebuilder:rbac:groups=podipc.dev,resources=channels,verbs=get;list;watch
// +kubebuilder:rbac:groups=podipc.dev,resources=channels/status,verbs=get;update;patch
// +kubebuilder:rbac:groups="",resources=pods,verbs=get;list;watch
// EndpointSlices are read everywhere but written only through SliceWriterRole, which the
// controller binds to itself per Channel namespace (applySliceWriter).
// +kubebuilder:rbac:groups=discovery.k8s.io,resources=endpointslices,verbs=get;list;watch
// +kubebuilder:rbac:groups=events.k8s.io,resources=events,verbs=create;patch
// RoleBindings: the controller binds the fixed ClusterRole podipc-member (MemberRole) to
// each channel's member service accounts; it writes no Role. bind is narrowed to that one
// ClusterRole (it also holds every right the role grants, which RBAC accepts instead).
// +kubebuilder:rbac:groups=rbac.authorization.k8s.io,resources=rolebindings,verbs=get;list;watch;create;update;patch;delete
// +kubebuilder:rbac:groups=rbac.authorization.k8s.io,resources=clusterroles,verbs=bind,resourceNames=podipc-member;podipc-slice-writer
// The controller's metrics server (cmd/podipc-controller --metrics-secure) authenticates
// and authorizes every scrape with the API server.
// +kubebuilder:rbac:groups=authentication.k8s.io,resources=tokenreviews,verbs=create
// +kubebuilder:rbac:groups=authorization.k8s.io,resources=subjectaccessreviews,verbs=create
// Leader election.
// +kubebuilder:rbac:groups=coordination.k8s.io,resources=leases,verbs=get;list;watch;create;update;patch;delete

// scope is what one reconcile computed for one channel.
type scope struct {
	channel *podipcv1alpha1.Channel
	owner   metav1.OwnerReference
	members []discoveryv1.Endpoint
	// published is what the slices say of each member beyond its endpoint: its service
	// account and whether it may only receive.
	published discovery.PublishedMembers
	accounts  []string // service accounts of the members, sorted and unique
	// notPermitted counts the pods refused by the Channel's spec.access.
	notPermitted int32
}

// Reconcile publishes the membership of one Channel.
func (r *Reconciler) Reconcile(ctx context.Context, req ctrl.Request) (_ ctrl.Result, retErr error) {
	logger := log.FromContext(ctx)
	ch := &podipcv1alpha1.Channel{}
	if err := r.Client.Get(ctx, req.NamespacedName, ch); err != nil {
		if apierrors.IsNotFound(err) {
			// Owned objects go with the Channel (garbage collection); pods that still
			// name it are told.
			return ctrl.Result{}, r.reportMissing(ctx, req.NamespacedName)
		}
		return ctrl.Result{}, err
	}
	r.forgetMissing(req.NamespacedName)
	if !ch.DeletionTimestamp.IsZero() {
		return ctrl.Result{}, nil
	}

	s, err := r.newScope(ctx, ch)
	if err != nil {
		return ctrl.Result{}, err
	}
	defer func() {
		if err := r.patchStatus(ctx, s, retErr); err != nil {
			retErr = errors.Join(retErr, fmt.Errorf("patching the status of Channel %s: %w", req, err))
		}
	}()

	// Access first: a member refused reading its channel retries only at its informers'
	// backoff, so access must not wait on (or be blocked by a failure of) the slices.
	if err := r.applyRBAC(ctx, s); err != nil {
		return r.applyFailed(ctx, "RBAC", err)
	}
	bound, err := r.applySliceWriter(ctx, s)
	if err != nil {
		return r.applyFailed(ctx, "the controller's RoleBinding", err)
	}
	if err := r.applySlices(ctx, s); err != nil {
		if bound && apierrors.IsForbidden(err) {
			// The authorizer has not seen the new binding yet.
			return ctrl.Result{RequeueAfter: staleRetry}, errStale
		}
		return r.applyFailed(ctx, "EndpointSlices", err)
	}
	logger.V(4).Info("Published Channel membership", "members", len(s.members), "serviceAccounts", len(s.accounts))
	return ctrl.Result{}, nil
}

// errStale marks a write refused because the cache was behind the API server; the
// channel is reconciled again once the cache has caught up, and the status is left alone.
var errStale = errors.New("cache behind the API server")

// applyFailed turns a write error into the reconcile result: conflicts from a stale cache
// requeue quietly, anything else is returned (and shown in the Ready condition).
func (r *Reconciler) applyFailed(ctx context.Context, what string, err error) (ctrl.Result, error) {
	if apierrors.IsConflict(err) || apierrors.IsAlreadyExists(err) || apierrors.IsNotFound(err) {
		log.FromContext(ctx).V(4).Info("Cache behind the API server, retrying", "objects", what, "err", err)
		return ctrl.Result{RequeueAfter: staleRetry}, errStale
	}
	return ctrl.Result{}, fmt.Errorf("writing %s: %w", what, err)
}

// newScope computes the desired membership of ch from the cache.
func (r *Reconciler) newScope(ctx context.Context, ch *podipcv1alpha1.Channel) (*scope, error) {
	pods := &corev1.PodList{}
	if err := r.Client.List(ctx, pods, client.InNamespace(ch.Namespace), client.MatchingFields{PodChannelsIndex: ch.Name}); err != nil {
		return nil, fmt.Errorf("listing the pods of Channel %s: %w", klog.KObj(ch), err)
	}
	s := &scope{
		channel: ch,
		owner: metav1.OwnerReference{
			APIVersion:         podipcv1alpha1.GroupVersion.String(),
			Kind:               "Channel",
			Name:               ch.Name,
			UID:                ch.UID,
			Controller:         ptr.To(true),
			BlockOwnerDeletion: ptr.To(true),
		},
		published: discovery.PublishedMembers{},
	}
	seen := map[string]bool{}
	for i := range pods.Items {
		pod := &pods.Items[i]
		if reason := Exclusion(pod, ch, r.Seal); reason != "" {
			if reason == ExcludedNotPermitted {
				s.notPermitted++
			}
			r.reportExcluded(ctx, pod, ch, reason)
			continue
		}
		// Access is granted as soon as a pod names the channel, before it has an IP, so
		// the binding usually exists before the sidecar starts; a sidecar refused access
		// only retries at its informers' backoff (up to tens of seconds).
		if sa := serviceAccountOf(pod); !seen[sa] && pod.Status.Phase != corev1.PodSucceeded && pod.Status.Phase != corev1.PodFailed {
			seen[sa] = true
			s.accounts = append(s.accounts, sa)
		}
		if ep, ok := endpointFor(pod); ok {
			s.members = append(s.members, ep)
			sa := serviceAccountOf(pod)
			s.published[string(pod.UID)] = discovery.PublishedMember{ServiceAccount: sa, ReceiveOnly: ch.Spec.Access.MayOnlyReceive(sa)}
		}
	}
	slices.Sort(s.accounts)
	return s, nil
}

// applySlices writes the channel's EndpointSlices: the fewest creates, updates and deletes
// that make them hold exactly the members.
func (r *Reconciler) applySlices(ctx context.Context, s *scope) error {
	existing := &discoveryv1.EndpointSliceList{}
	if err := r.Client.List(ctx, existing, client.InNamespace(s.channel.Namespace),
		client.MatchingLabels{podipcv1alpha1.ChannelLabel: s.channel.Name, ManagedByLabel: ManagedBy}); err != nil {
		return err
	}
	var own []discoveryv1.EndpointSlice
	for _, es := range existing.Items {
		if metav1.IsControlledBy(&es, s.channel) {
			own = append(own, es)
		}
	}
	return r.writeSlices(ctx, planSlices(s.channel, own, s.members, s.owner, s.published))
}

// patchStatus writes the status once, and only if it changed. ObservedGeneration moves
// only when everything was published; a stale-cache retry leaves the status as it was.
func (r *Reconciler) patchStatus(ctx context.Context, s *scope, reconcileErr error) error {
	if errors.Is(reconcileErr, errStale) {
		return nil
	}
	ch := s.channel.DeepCopy() // s.channel came from the cache: never modify it
	ch.Status.Members = int32(len(s.members))
	ch.Status.NotPermitted = s.notPermitted
	ch.Status.Access = podipcv1alpha1.AccessOpen
	if ch.Spec.Access != nil {
		ch.Status.Access = podipcv1alpha1.AccessRestricted
	}
	ch.Status.ReadyMembers = 0
	for _, ep := range s.members {
		if *ep.Conditions.Ready {
			ch.Status.ReadyMembers++
		}
	}
	cond := metav1.Condition{
		Type:               podipcv1alpha1.ConditionReady,
		Status:             metav1.ConditionTrue,
		Reason:             podipcv1alpha1.ReasonMembershipPublished,
		Message:            fmt.Sprintf("%d of %d members ready", ch.Status.ReadyMembers, ch.Status.Members),
		ObservedGeneration: ch.Generation,
	}
	if reconcileErr != nil {
		cond.Status, cond.Reason, cond.Message = metav1.ConditionFalse, podipcv1alpha1.ReasonPublishFailed, reconcileErr.Error()
	} else {
		ch.Status.ObservedGeneration = ch.Generation
	}
	meta.SetStatusCondition(&ch.Status.Conditions, cond)
	if equality.Semantic.DeepEqual(ch.Status, s.channel.Status) {
		return nil
	}
	return r.Client.Status().Patch(ctx, ch, client.MergeFrom(s.channel))
}

// excludedCounter counts pods that name a channel but are not published, by reason.
var excludedCounter = prometheus.NewCounterVec(prometheus.CounterOpts{
	Name: "podipc_membership_excluded_total",
	Help: "Pods that name a Channel but are not published as members, by reason (host_network, no_seal, bad_seal, not_permitted); each pod counted once per reason.",
}, []string{"reason"})

func init() { metrics.Registry.MustRegister(excludedCounter) }

// maxExcludedRemembered bounds the excluded set; past it the set starts over (a pod may
// then be reported a second time, never missed).
const maxExcludedRemembered = 10000

// reportExcluded logs and counts a pod kept out of a channel's membership, once per pod
// and reason.
func (r *Reconciler) reportExcluded(ctx context.Context, pod *corev1.Pod, ch *podipcv1alpha1.Channel, reason string) {
	r.excludedMu.Lock()
	if r.excluded == nil || len(r.excluded) > maxExcludedRemembered {
		r.excluded = map[string]string{}
	}
	key := string(pod.UID) + "/" + ch.Name
	seen := r.excluded[key] == reason
	r.excluded[key] = reason
	r.excludedMu.Unlock()
	if seen {
		return
	}
	excludedCounter.WithLabelValues(reason).Inc()
	log.FromContext(ctx).Info("Not publishing a pod as a Channel member", "pod", klog.KObj(pod), "channel", klog.KObj(ch), "reason", reason)
}
