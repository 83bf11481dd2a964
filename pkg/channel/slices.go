package channel

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/pkg/discovery"
)

const (
	// ManagedByLabel marks the EndpointSlices this controller owns, the way the
	// Kubernetes EndpointSlice controller marks its own.
	ManagedByLabel = discoveryv1.LabelManagedBy
	// ManagedBy is the value of ManagedByLabel on podipc's EndpointSlices.
	ManagedBy = podipcv1alpha1.ManagedBy

	// MaxEndpointsPerSlice bounds a slice, like the Kubernetes EndpointSlice controller's
	// default: a change to one member rewrites at most 100 endpoints.
	MaxEndpointsPerSlice = 100
)

// slicePlan is the set of writes that turns a channel's existing slices into the desired
// ones.
type slicePlan struct {
	create, update, delete []*discoveryv1.EndpointSlice
}

// planSlices assigns the desired endpoints to slices, keeping each endpoint in the slice
// it is already in, so that a member joining, leaving or changing readiness rewrites one
// slice, not all of them. New endpoints go first into slices that are rewritten anyway,
// then into any slice with room, and only then into new slices. A slice left empty is
// deleted.
//
// After many departures the slices are compacted: once a channel has more than
// ⌈members/100⌉ + 1 slices, its fullest ⌈members/100⌉ stay and take in the endpoints of
// the others, which are deleted. The slack of one slice keeps a channel hovering around a
// multiple of 100 members from moving endpoints back and forth on every change; moving the
// members of the emptiest slices moves the fewest endpoints.
//
// Each slice carries, in its podipc.dev/members annotation, the entries of published
// for its own endpoints (see annotate); a change there alone rewrites that slice.
//
// existing must be the channel's slices (from the cache; they are not modified). The
// returned objects are fresh copies, ready to write.
func planSlices(ch *podipcv1alpha1.Channel, existing []discoveryv1.EndpointSlice, desired []discoveryv1.Endpoint, owner metav1.OwnerReference, published discovery.PublishedMembers) slicePlan {
	want := make(map[types.UID]discoveryv1.Endpoint, len(desired))
	for _, ep := range desired {
		want[ep.TargetRef.UID] = ep
	}
	existing = slices.Clone(existing)
	slices.SortFunc(existing, func(a, b discoveryv1.EndpointSlice) int { return strings.Compare(a.Name, b.Name) })

	var plan slicePlan
	var kept []*discoveryv1.EndpointSlice // every slice that stays, with its new endpoints
	changed := map[*discoveryv1.EndpointSlice]bool{}
	origin := map[*discoveryv1.EndpointSlice]*discoveryv1.EndpointSlice{} // kept slice → as it is now
	placed := make(map[types.UID]bool, len(desired))
	for i := range existing {
		s := desiredSlice(ch, &existing[i], owner)
		s.Endpoints = s.Endpoints[:0]
		for _, ep := range existing[i].Endpoints {
			if ep.TargetRef == nil || placed[ep.TargetRef.UID] {
				continue // not ours, or a duplicate left by an interrupted rewrite
			}
			if d, ok := want[ep.TargetRef.UID]; ok {
				s.Endpoints = append(s.Endpoints, d)
				placed[ep.TargetRef.UID] = true
			}
		}
		if len(s.Endpoints) == 0 {
			plan.delete = append(plan.delete, existing[i].DeepCopy())
			continue
		}
		kept = append(kept, s)
		origin[s] = &existing[i]
		annotate(s, published)
		changed[s] = !equality.Semantic.DeepEqual(&existing[i], s)
	}

	var fresh []discoveryv1.Endpoint
	for _, ep := range desired {
		if !placed[ep.TargetRef.UID] {
			fresh = append(fresh, ep)
		}
	}
	slices.SortFunc(fresh, func(a, b discoveryv1.Endpoint) int { return cmp.Compare(a.TargetRef.Name, b.TargetRef.Name) })
	kept, moved, emptied := compact(kept, len(desired))
	fresh = append(moved, fresh...)
	for _, s := range emptied {
		for i := range existing {
			if existing[i].Name == s.Name {
				plan.delete = append(plan.delete, existing[i].DeepCopy())
			}
		}
	}

	// Fill slices that are written anyway first, then the others with room.
	for _, pass := range []bool{true, false} {
		for _, s := range kept {
			if changed[s] != pass {
				continue
			}
			n := min(MaxEndpointsPerSlice-len(s.Endpoints), len(fresh))
			if n > 0 {
				s.Endpoints = append(s.Endpoints, fresh[:n]...)
				fresh = fresh[n:]
				changed[s] = true
			}
		}
	}
	for _, s := range kept {
		if changed[s] {
			annotate(s, published)
			if equality.Semantic.DeepEqual(origin[s], s) {
				continue // back as it was
			}
			plan.update = append(plan.update, s)
		}
	}

	names := map[string]bool{}
	for i := range existing {
		names[existing[i].Name] = true
	}
	for len(fresh) > 0 {
		n := min(MaxEndpointsPerSlice, len(fresh))
		s := desiredSlice(ch, &discoveryv1.EndpointSlice{}, owner)
		s.Name = freeSliceName(ch.Name, names)
		s.Endpoints = slices.Clone(fresh[:n])
		fresh = fresh[n:]
		annotate(s, published)
		plan.create = append(plan.create, s)
	}
	return plan
}

// annotate sets the slice's podipc.dev/members annotation to the entries of published
// for the slice's endpoints, and removes it if there are none. Each slice carries only
// its own endpoints' entries, so that a member's change rewrites the one slice holding it
// and a reader takes an entry only from the slice that lists the endpoint.
func annotate(s *discoveryv1.EndpointSlice, published discovery.PublishedMembers) {
	own := discovery.PublishedMembers{}
	for _, ep := range s.Endpoints {
		if pm, ok := published[string(ep.TargetRef.UID)]; ok {
			own[string(ep.TargetRef.UID)] = pm
		}
	}
	if len(own) == 0 {
		delete(s.Annotations, podipcv1alpha1.MembersAnnotation)
		if len(s.Annotations) == 0 {
			s.Annotations = nil
		}
		return
	}
	raw, err := json.Marshal(own)
	if err != nil {
		panic(err) // a map of strings and bools always encodes
	}
	if s.Annotations == nil {
		s.Annotations = map[string]string{}
	}
	s.Annotations[podipcv1alpha1.MembersAnnotation] = string(raw)
}

// compact keeps the fullest ⌈members/100⌉ of kept if there are more than ⌈members/100⌉ + 1
// of them (ties keep the lower name, so a replanning agrees). It returns the slices that
// stay, the endpoints of the others (in their slices' order), and the others, which are
// to be deleted. The slices that stay have room for every member: no slice is created in
// the same plan that deletes one.
func compact(kept []*discoveryv1.EndpointSlice, members int) (stay []*discoveryv1.EndpointSlice, moved []discoveryv1.Endpoint, emptied []*discoveryv1.EndpointSlice) {
	need := (members + MaxEndpointsPerSlice - 1) / MaxEndpointsPerSlice
	if len(kept) <= need+1 {
		return kept, nil, nil
	}
	byFill := slices.Clone(kept)
	slices.SortStableFunc(byFill, func(a, b *discoveryv1.EndpointSlice) int { return cmp.Compare(len(b.Endpoints), len(a.Endpoints)) })
	keep := map[*discoveryv1.EndpointSlice]bool{}
	for _, s := range byFill[:need] {
		keep[s] = true
	}
	for _, s := range kept {
		if keep[s] {
			stay = append(stay, s)
			continue
		}
		moved = append(moved, s.Endpoints...)
		emptied = append(emptied, s)
	}
	return stay, moved, emptied
}

// writeSlices makes the plan's writes in the order that never hides a live member from a
// watcher of the slices: creates and updates first, so that an endpoint moving between
// slices is in its new slice before its old slice is deleted (a reader sees it twice for
// a moment, and dedupes by pod UID), deletes last. The Kubernetes EndpointSlice
// reconciler orders its writes the same way.
func (r *Reconciler) writeSlices(ctx context.Context, plan slicePlan) error {
	for _, es := range plan.create {
		if err := r.Client.Create(ctx, es); err != nil {
			return err
		}
	}
	for _, es := range plan.update {
		if err := r.Client.Update(ctx, es); err != nil {
			return err
		}
	}
	for _, es := range plan.delete {
		if err := r.Client.Delete(ctx, es, client.Preconditions{UID: &es.UID, ResourceVersion: &es.ResourceVersion}); err != nil {
			return err
		}
	}
	return nil
}

// desiredSlice returns a copy of base with everything but the endpoints set to what the
// controller wants: labels, owner, address type and the peer port.
func desiredSlice(ch *podipcv1alpha1.Channel, base *discoveryv1.EndpointSlice, owner metav1.OwnerReference) *discoveryv1.EndpointSlice {
	s := base.DeepCopy()
	s.Namespace = ch.Namespace
	if s.Labels == nil {
		s.Labels = map[string]string{}
	}
	s.Labels[podipcv1alpha1.ChannelLabel] = ch.Name
	s.Labels[ManagedByLabel] = ManagedBy
	s.OwnerReferences = []metav1.OwnerReference{owner}
	s.AddressType = discoveryv1.AddressTypeIPv4
	s.Ports = []discoveryv1.EndpointPort{{
		Name:     ptr.To(podipcv1alpha1.PeerPortName),
		Port:     ptr.To[int32](podipcv1alpha1.PeerPort),
		Protocol: ptr.To(corev1.ProtocolTCP),
	}}
	return s
}

// freeSliceName returns the lowest-numbered unused slice name of a channel. Names are
// deterministic (not generateName) so that a create from a stale cache fails with
// AlreadyExists instead of duplicating a slice.
func freeSliceName(channel string, used map[string]bool) string {
	for i := 0; ; i++ {
		name := fmt.Sprintf("podipc-%s-%d", channel, i)
		if !used[name] {
			used[name] = true
			return name
		}
	}
}
