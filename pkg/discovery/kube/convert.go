package kube

import (
	"slices"
	"strings"

	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/pkg/discovery"
)

// SpecFromChannel converts a Channel's spec into the sidecar's view, with every field the
// API server did not default (an object written before a default existed) set to the
// same default.
func SpecFromChannel(ch *podipcv1alpha1.Channel) discovery.Spec {
	s := discovery.Spec{
		LocalPort:       int(ch.Spec.LocalPort),
		Delivery:        discovery.Delivery(ch.Spec.Delivery),
		MaxMessageBytes: int(ch.Spec.MaxMessageBytes),
		Overflow: discovery.Overflow{
			Policy:     discovery.OverflowPolicy(ch.Spec.Overflow.Policy),
			QueueBytes: int(ch.Spec.Overflow.QueueBytes),
		},
	}
	if ch.Spec.Overflow.MaxWait != nil {
		s.Overflow.MaxWait = ch.Spec.Overflow.MaxWait.Duration
	}
	return s.WithDefaults()
}

// membersFromSlices returns the members listed in a channel's EndpointSlices, each pod
// once (while the controller moves an endpoint between slices it may briefly be in two),
// sorted by pod name. Only slices controlled by the Channel with UID owner count, so a
// leftover slice of an earlier Channel of the same name is ignored.
func membersFromSlices(owner *podipcv1alpha1.Channel, eps []*discoveryv1.EndpointSlice) []discovery.Member {
	var out []discovery.Member
	seen := map[string]bool{}
	for _, es := range eps {
		if !metav1.IsControlledBy(es, owner) {
			continue
		}
		port := peerPort(es)
		for _, ep := range es.Endpoints {
			if ep.TargetRef == nil || ep.TargetRef.Kind != "Pod" || len(ep.Addresses) == 0 || seen[string(ep.TargetRef.UID)] {
				continue
			}
			seen[string(ep.TargetRef.UID)] = true
			// Nil conditions mean "unknown"; the EndpointSlice API says to treat an unknown
			// ready as ready, and serving defaults to ready.
			ready := ep.Conditions.Ready == nil || *ep.Conditions.Ready
			serving := ready
			if ep.Conditions.Serving != nil {
				serving = *ep.Conditions.Serving
			}
			out = append(out, discovery.Member{
				Namespace:   es.Namespace,
				Name:        ep.TargetRef.Name,
				UID:         string(ep.TargetRef.UID),
				IP:          ep.Addresses[0],
				PeerPort:    port,
				Ready:       ready,
				Serving:     serving,
				Terminating: ep.Conditions.Terminating != nil && *ep.Conditions.Terminating,
			})
		}
	}
	slices.SortFunc(out, func(a, b discovery.Member) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// peerPort returns the slice's podipc-peer port, or the well-known one.
func peerPort(es *discoveryv1.EndpointSlice) int {
	for _, p := range es.Ports {
		if p.Name != nil && *p.Name == podipcv1alpha1.PeerPortName && p.Port != nil {
			return int(*p.Port)
		}
	}
	return podipcv1alpha1.PeerPort
}
