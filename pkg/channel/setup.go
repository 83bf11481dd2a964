package channel

import (
	"context"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
)

// staleRetry is how soon a reconcile refused by a stale cache runs again; the watch
// event of our own write usually re-enqueues the channel sooner.
const staleRetry = 200 * time.Millisecond

// CacheByObject narrows the manager's cache to what the controller reads: injected pods
// only (their managed fields stripped), and only the EndpointSlices and RoleBindings it
// manages. Pass it as cache.Options.ByObject when creating the manager;
// without it the controller would cache every pod of the cluster.
func CacheByObject() map[client.Object]cache.ByObject {
	mustSelector := func(key string, op selection.Operator, values ...string) labels.Selector {
		req, err := labels.NewRequirement(key, op, values)
		if err != nil {
			panic(err) // constant input
		}
		return labels.NewSelector().Add(*req)
	}
	owned := mustSelector(podipcv1alpha1.ChannelLabel, selection.Exists)
	return map[client.Object]cache.ByObject{
		&corev1.Pod{}: {
			Label:     labels.SelectorFromSet(labels.Set{podipcv1alpha1.InjectedLabel: "true"}),
			Transform: cache.TransformStripManagedFields(),
		},
		&discoveryv1.EndpointSlice{}: {Label: mustSelector(ManagedByLabel, selection.Equals, ManagedBy)},
		&rbacv1.RoleBinding{}:        {Label: owned},
	}
}

// SetupWithManager registers the pod index and the controller. concurrency is the number
// of channels reconciled at once.
func (r *Reconciler) SetupWithManager(ctx context.Context, mgr ctrl.Manager, concurrency int) error {
	if err := mgr.GetFieldIndexer().IndexField(ctx, &corev1.Pod{}, PodChannelsIndex, func(o client.Object) []string {
		return ChannelsOf(o.(*corev1.Pod))
	}); err != nil {
		return err
	}
	return ctrl.NewControllerManagedBy(mgr).
		For(&podipcv1alpha1.Channel{}).
		Owns(&discoveryv1.EndpointSlice{}).
		Owns(&rbacv1.RoleBinding{}).
		Watches(&corev1.Pod{}, handler.EnqueueRequestsFromMapFunc(podToChannels)).
		WithOptions(controller.Options{MaxConcurrentReconciles: concurrency}).
		Complete(r)
}

// podToChannels maps a pod onto the channels its sidecar names.
func podToChannels(_ context.Context, o client.Object) []reconcile.Request {
	names := ChannelsOf(o.(*corev1.Pod))
	reqs := make([]reconcile.Request, 0, len(names))
	for _, name := range names {
		reqs = append(reqs, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: o.GetNamespace(), Name: name}})
	}
	return reqs
}
