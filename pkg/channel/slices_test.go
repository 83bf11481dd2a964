package channel

import (
	"fmt"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
)

func testEndpoint(i int, ready bool) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{
		Addresses:  []string{fmt.Sprintf("10.0.%d.%d", i/200, i%200+1)},
		Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(ready), Serving: ptr.To(ready), Terminating: ptr.To(false)},
		TargetRef:  &corev1.ObjectReference{Kind: "Pod", Name: fmt.Sprintf("p%04d", i), UID: types.UID(fmt.Sprint("uid-", i))},
	}
}

// applyPlan returns the slices after the plan's writes.
func applyPlan(existing []discoveryv1.EndpointSlice, plan slicePlan) []discoveryv1.EndpointSlice {
	byName := map[string]discoveryv1.EndpointSlice{}
	for _, s := range existing {
		byName[s.Name] = s
	}
	for _, s := range plan.delete {
		delete(byName, s.Name)
	}
	for _, s := range append(plan.update, plan.create...) {
		byName[s.Name] = *s
	}
	var out []discoveryv1.EndpointSlice
	for _, s := range byName {
		out = append(out, s)
	}
	return out
}

// TestPlanSlicesIsStable: a change to one member rewrites one slice, and planning again
// after the writes changes nothing.
func TestPlanSlicesIsStable(t *testing.T) {
	ch := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "c", UID: "ch-uid"}}
	owner := metav1.OwnerReference{APIVersion: "podipc.dev/v1alpha1", Kind: "Channel", Name: "c", UID: "ch-uid", Controller: ptr.To(true)}
	members := func(n int, edit func(i int, ep *discoveryv1.Endpoint) bool) []discoveryv1.Endpoint {
		var out []discoveryv1.Endpoint
		for i := range n {
			ep := testEndpoint(i, true)
			if edit == nil || edit(i, &ep) {
				out = append(out, ep)
			}
		}
		return out
	}
	base := applyPlan(nil, planSlices(ch, nil, members(250, nil), owner, nil))
	if len(base) != 3 {
		t.Fatalf("250 members in %d slices, want 3", len(base))
	}

	tests := map[string]struct {
		members                 []discoveryv1.Endpoint
		creates, updates, drops int
	}{
		"no change":       {members(250, nil), 0, 0, 0},
		"readiness flip":  {members(250, func(i int, ep *discoveryv1.Endpoint) bool { ep.Conditions.Ready = ptr.To(i != 7); return true }), 0, 1, 0},
		"one joins":       {members(251, nil), 0, 1, 0},
		"one leaves":      {members(250, func(i int, _ *discoveryv1.Endpoint) bool { return i != 120 }), 0, 1, 0},
		"one slice empty": {members(250, func(i int, _ *discoveryv1.Endpoint) bool { return i >= 100 }), 0, 0, 1},
		"leave and join":  {append(members(250, func(i int, _ *discoveryv1.Endpoint) bool { return i != 5 }), testEndpoint(999, true)), 0, 1, 0},
		"51 join":         {members(301, nil), 1, 1, 0},
		// 125 members fit 2 slices; 3 are within the slack of one: no endpoint moves.
		"half leave": {members(250, func(i int, _ *discoveryv1.Endpoint) bool { return i%2 == 0 }), 0, 3, 0},
		// 50 members left over 3 slices (20, 20, 10): the first stays and takes in the rest.
		"four in five leave": {members(250, func(i int, _ *discoveryv1.Endpoint) bool { return i%5 == 0 }), 0, 1, 2},
		"all leave":          {members(0, nil), 0, 0, 3},
		// Newcomers go with the moved endpoints into the slice that stays: no create.
		"four in five leave, ten join": {append(members(250, func(i int, _ *discoveryv1.Endpoint) bool { return i%5 == 0 }),
			testEndpoint(1000, true), testEndpoint(1001, true), testEndpoint(1002, true), testEndpoint(1003, true), testEndpoint(1004, true),
			testEndpoint(1005, true), testEndpoint(1006, true), testEndpoint(1007, true), testEndpoint(1008, true), testEndpoint(1009, true)), 0, 1, 2},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			plan := planSlices(ch, base, tc.members, owner, nil)
			if len(plan.create) != tc.creates || len(plan.update) != tc.updates || len(plan.delete) != tc.drops {
				t.Errorf("plan: %d creates, %d updates, %d deletes; want %d, %d, %d",
					len(plan.create), len(plan.update), len(plan.delete), tc.creates, tc.updates, tc.drops)
			}
			after := applyPlan(base, plan)
			seen := map[types.UID]bool{}
			for _, s := range after {
				if len(s.Endpoints) > 100 {
					t.Errorf("slice %s holds %d endpoints", s.Name, len(s.Endpoints))
				}
				for _, ep := range s.Endpoints {
					if seen[ep.TargetRef.UID] {
						t.Errorf("%s is in two slices", ep.TargetRef.Name)
					}
					seen[ep.TargetRef.UID] = true
				}
			}
			if most := (len(tc.members)+99)/100 + 1; len(after) > most {
				t.Errorf("%d members in %d slices, want at most %d", len(tc.members), len(after), most)
			}
			if len(seen) != len(tc.members) {
				t.Errorf("%d endpoints published, want %d", len(seen), len(tc.members))
			}
			if again := planSlices(ch, after, tc.members, owner, nil); len(again.create)+len(again.update)+len(again.delete) != 0 {
				t.Errorf("planning again after the writes is not a no-op: %+v", again)
			}
		})
	}
}
