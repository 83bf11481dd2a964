package channel

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// reportMissing puts a Warning Event on each pod that names a channel that does not
// exist, once per pod for as long as the channel stays missing.
func (r *Reconciler) reportMissing(ctx context.Context, channel types.NamespacedName) error {
	pods := &corev1.PodList{}
	if err := r.Client.List(ctx, pods, client.InNamespace(channel.Namespace), client.MatchingFields{PodChannelsIndex: channel.Name}); err != nil {
		return fmt.Errorf("listing the pods of missing Channel %s: %w", channel, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.reported == nil {
		r.reported = map[types.NamespacedName]map[types.UID]bool{}
	}
	// Rebuilt from the current pods, so pods that are gone are forgotten.
	prev, next := r.reported[channel], map[types.UID]bool{}
	for i := range pods.Items {
		pod := &pods.Items[i]
		next[pod.UID] = true
		if !prev[pod.UID] {
			r.Recorder.Eventf(pod, nil, corev1.EventTypeWarning, ReasonChannelNotFound, "Join",
				"Channel %q named in %s does not exist in namespace %s; the pod joins it once it is created",
				channel.Name, "PODIPC_CHANNELS", channel.Namespace)
		}
	}
	if len(next) == 0 {
		delete(r.reported, channel)
	} else {
		r.reported[channel] = next
	}
	return nil
}

// forgetMissing notes that a channel exists, so a later absence is reported afresh.
func (r *Reconciler) forgetMissing(channel types.NamespacedName) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.reported, channel)
}
