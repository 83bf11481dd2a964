package kube

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

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
	if ch.Spec.Overflow.MaxBlock != nil {
		s.Overflow.MaxBlock = ch.Spec.Overflow.MaxBlock.Duration
	}
	return s.WithDefaults()
}

// managedByLabel is discoveryv1.LabelManagedBy, spelled out so that the sidecar does not
// link k8s.io/api/discovery/v1 for one constant: that package imports k8s.io/api/core/v1,
// and the two add 4.4 MB to the binary and 0.7 to 1.8 MB to the sidecar's idle RSS in
// every mode (start-up touches pages all over the binary, and the kernel maps the pages
// around each one it faults in, so RSS grows with the binary; see docs/performance.md).
// TestDiscoveryV1Names ties the two together, and cmd/podipc-sidecar's TestDependencies
// keeps k8s.io/api out.
const managedByLabel = "endpointslice.kubernetes.io/managed-by"

// endpointSlice is the part of a discovery.k8s.io/v1 EndpointSlice that the sidecar
// reads, decoded from the informer's unstructured objects. It is a local type rather
// than discoveryv1.EndpointSlice for the same reason as managedByLabel; its JSON names
// are those of the real type, which TestSnapshotMembers checks by encoding real
// EndpointSlices.
type endpointSlice struct {
	Metadata  sliceMeta  `json:"metadata"`
	Endpoints []endpoint `json:"endpoints"`
	Ports     []port     `json:"ports"`
}

// memberSlice is a decoded EndpointSlice with its decoded podipc.dev/members annotation
// (nil when the slice has none).
type memberSlice struct {
	*endpointSlice
	published discovery.PublishedMembers
}

// sliceMeta is the part of an EndpointSlice's metadata that the sidecar reads.
type sliceMeta struct {
	Namespace       string                  `json:"namespace"`
	Labels          map[string]string       `json:"labels"`
	Annotations     map[string]string       `json:"annotations"`
	OwnerReferences []metav1.OwnerReference `json:"ownerReferences"`
}

// endpoint is one discoveryv1.Endpoint: a pod's addresses and conditions.
type endpoint struct {
	Addresses  []string   `json:"addresses"`
	Conditions conditions `json:"conditions"`
	TargetRef  *targetRef `json:"targetRef"`
}

// conditions is discoveryv1.EndpointConditions; nil means unknown.
type conditions struct {
	Ready       *bool `json:"ready"`
	Serving     *bool `json:"serving"`
	Terminating *bool `json:"terminating"`
}

// targetRef is the part of an endpoint's corev1.ObjectReference that the sidecar reads.
type targetRef struct {
	Kind string    `json:"kind"`
	Name string    `json:"name"`
	UID  types.UID `json:"uid"`
}

// port is discoveryv1.EndpointPort without the protocol and app protocol.
type port struct {
	Name *string `json:"name"`
	Port *int32  `json:"port"`
}

// controlledBy reports whether the slice's controller is the object with UID uid, as
// metav1.IsControlledBy does: only the first owner reference marked controller counts.
func (m *sliceMeta) controlledBy(uid types.UID) bool {
	for _, ref := range m.OwnerReferences {
		if ref.Controller != nil && *ref.Controller {
			return ref.UID == uid
		}
	}
	return false
}

// membersFromSlices returns the members listed in a channel's EndpointSlices, each pod
// once (while the controller moves an endpoint between slices it may briefly be in two),
// sorted by pod name. Only slices controlled by the Channel with UID owner count, so a
// leftover slice of an earlier Channel of the same name is ignored.
func membersFromSlices(owner *podipcv1alpha1.Channel, eps []memberSlice) []discovery.Member {
	var out []discovery.Member
	seen := map[string]bool{}
	for _, es := range eps {
		if !es.Metadata.controlledBy(owner.UID) {
			continue
		}
		port := peerPort(es.endpointSlice)
		published := es.published
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
			pm := published[string(ep.TargetRef.UID)]
			out = append(out, discovery.Member{
				Namespace:   es.Metadata.Namespace,
				Name:        ep.TargetRef.Name,
				UID:         string(ep.TargetRef.UID),
				IP:          ep.Addresses[0],
				PeerPort:    port,
				Ready:       ready,
				Serving:     serving,
				Terminating: ep.Conditions.Terminating != nil && *ep.Conditions.Terminating,
				// A slice of a controller that publishes no annotation leaves the account
				// unknown (not compared) and the member free to send.
				ServiceAccount: pm.ServiceAccount,
				ReceiveOnly:    pm.ReceiveOnly,
			})
		}
	}
	slices.SortFunc(out, func(a, b discovery.Member) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// publishedMembers decodes the slice's podipc.dev/members annotation.
// A slice without one leaves every member's account unknown (not compared) and lets it
// send, as a controller that publishes none meant. One that cannot be decoded is an error:
// only a hand edit or a foreign writer makes one, and the slice is then ignored (fails
// closed) rather than read as if the controller had published no restriction.
func publishedMembers(es *endpointSlice) (discovery.PublishedMembers, error) {
	raw, ok := es.Metadata.Annotations[podipcv1alpha1.MembersAnnotation]
	if !ok {
		return nil, nil
	}
	var pm discovery.PublishedMembers
	if err := json.Unmarshal([]byte(raw), &pm); err != nil {
		return nil, fmt.Errorf("annotation %s: %w", podipcv1alpha1.MembersAnnotation, err)
	}
	return pm, nil
}

// peerPort returns the slice's podipc-peer port, or the well-known one.
func peerPort(es *endpointSlice) int {
	for _, p := range es.Ports {
		if p.Name != nil && *p.Name == podipcv1alpha1.PeerPortName && p.Port != nil {
			return int(*p.Port)
		}
	}
	return podipcv1alpha1.PeerPort
}
