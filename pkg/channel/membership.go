package channel

import (
	"errors"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/utils/ptr"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/pkg/seal"
)

// Reasons a pod that names a channel is not a member (the reason label of
// podipc_membership_excluded_total, and the log).
const (
	// ExcludedHostNetwork: the pod shares its node's network, so its IP is the node's;
	// podipc never injects such pods, so one that claims a sidecar is forged.
	ExcludedHostNetwork = "host_network"
	// ExcludedNoSeal: the pod carries no seal, so the webhook did not inject it.
	ExcludedNoSeal = "no_seal"
	// ExcludedBadSeal: the seal does not hold for the pod's account and channels.
	ExcludedBadSeal = "bad_seal"
	// ExcludedNotPermitted: the Channel's spec.access does not list the pod's account.
	ExcludedNotPermitted = "not_permitted"
)

// Exclusion returns why pod may not be a member of ch, or "" if it may. key, if set, is
// the seal key (see package seal): pods must carry the webhook's seal.
func Exclusion(pod *corev1.Pod, ch *podipcv1alpha1.Channel, key *seal.Key) string {
	switch {
	case pod.Spec.HostNetwork:
		return ExcludedHostNetwork
	case !ch.Spec.Access.Allows(serviceAccountOf(pod)):
		return ExcludedNotPermitted
	}
	if key != nil {
		switch err := key.Check(pod, ChannelsOf(pod)); {
		case err == nil:
		case errors.Is(err, seal.ErrMissing):
			return ExcludedNoSeal
		default:
			return ExcludedBadSeal
		}
	}
	return ""
}

// ChannelsOf returns the channels a pod's sidecar serves: the comma-separated names in
// PODIPC_CHANNELS of the container named podipc-sidecar, looked up among the init
// containers (native sidecar) and then the containers. The env var, not the pod's
// annotation, is the truth: the webhook copies the annotation into it at admission, and
// neither can change for a running pod. Duplicates and blanks are dropped.
func ChannelsOf(pod *corev1.Pod) []string {
	for _, list := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for i := range list {
			if list[i].Name != podipcv1alpha1.SidecarContainerName {
				continue
			}
			for _, env := range list[i].Env {
				if env.Name == podipcv1alpha1.ChannelsEnv {
					return splitChannels(env.Value)
				}
			}
			return nil
		}
	}
	return nil
}

func splitChannels(value string) []string {
	var names []string
	for name := range strings.SplitSeq(value, ",") {
		name = strings.TrimSpace(name)
		if name != "" && !slices.Contains(names, name) {
			names = append(names, name)
		}
	}
	return names
}

// endpointFor returns the EndpointSlice endpoint of a member pod, and false for a pod
// that cannot be a member yet or any more: no publishable IPv4 address, or a terminal
// phase.
func endpointFor(pod *corev1.Pod) (discoveryv1.Endpoint, bool) {
	if pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return discoveryv1.Endpoint{}, false
	}
	ip := podIPv4(pod)
	if ip == "" {
		return discoveryv1.Endpoint{}, false
	}
	podReady := false
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady {
			podReady = c.Status == corev1.ConditionTrue
		}
	}
	terminating := pod.DeletionTimestamp != nil
	ep := discoveryv1.Endpoint{
		Addresses: []string{ip},
		// Ready follows the EndpointSlice convention: a terminating pod is never ready,
		// but keeps serving (and receiving) while its PodReady condition holds.
		Conditions: discoveryv1.EndpointConditions{
			Ready:       ptr.To(podReady && !terminating),
			Serving:     ptr.To(podReady),
			Terminating: ptr.To(terminating),
		},
		TargetRef: &corev1.ObjectReference{
			Kind:      "Pod",
			Namespace: pod.Namespace,
			Name:      pod.Name,
			UID:       pod.UID,
		},
	}
	if pod.Spec.NodeName != "" {
		ep.NodeName = ptr.To(pod.Spec.NodeName)
	}
	return ep, true
}

// podIPv4 returns the pod's IPv4 address, or "" if it has none that an EndpointSlice
// can hold (the slices are IPv4).
func podIPv4(pod *corev1.Pod) string {
	ips := make([]string, 0, 1+len(pod.Status.PodIPs))
	ips = append(ips, pod.Status.PodIP)
	for _, ip := range pod.Status.PodIPs {
		ips = append(ips, ip.IP)
	}
	for _, s := range ips {
		if a, err := netip.ParseAddr(s); err == nil && a.Is4() && publishable(a) {
			return a.String()
		}
	}
	return ""
}

// publishable reports whether the API server accepts a as an EndpointSlice address. It
// refuses unspecified, loopback and link-local addresses (ValidateEndpointIP in
// k8s.io/kubernetes/pkg/apis/core/validation), and refuses the whole slice for one such
// endpoint: a single pod with such an IP would otherwise keep every member of its
// channel unpublished. No pod network hands them out, so a pod that has one is not a
// member, the same as a pod without an IP.
func publishable(a netip.Addr) bool {
	return !a.IsUnspecified() && !a.IsLoopback() && !a.IsLinkLocalUnicast() && !a.IsLinkLocalMulticast()
}

// serviceAccountOf returns the service account a pod runs as.
func serviceAccountOf(pod *corev1.Pod) string {
	if pod.Spec.ServiceAccountName == "" {
		return "default"
	}
	return pod.Spec.ServiceAccountName
}
