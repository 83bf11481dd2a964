package kube

import (
	"slices"
	"testing"

	"github.com/go-logr/logr/testr"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	apiruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/pkg/discovery"
)

// The sidecar spells out what it would otherwise import from k8s.io/api/discovery/v1.
func TestDiscoveryV1Names(t *testing.T) {
	if managedByLabel != discoveryv1.LabelManagedBy {
		t.Errorf("managedByLabel = %q, want discoveryv1.LabelManagedBy %q", managedByLabel, discoveryv1.LabelManagedBy)
	}
	if want := discoveryv1.SchemeGroupVersion.WithResource("endpointslices"); slicesResource != want {
		t.Errorf("slicesResource = %v, want %v", slicesResource, want)
	}
}

const (
	testNamespace = "ns"
	feedUID       = types.UID("uid-feed")
)

// slice returns an EndpointSlice of channel feed controlled by the object with UID owner,
// as the controller writes them.
func slice(name string, owner types.UID, ports []discoveryv1.EndpointPort, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		TypeMeta: metav1.TypeMeta{APIVersion: "discovery.k8s.io/v1", Kind: "EndpointSlice"},
		ObjectMeta: metav1.ObjectMeta{
			Namespace: testNamespace, Name: name,
			Labels: map[string]string{podipcv1alpha1.ChannelLabel: "feed", discoveryv1.LabelManagedBy: podipcv1alpha1.ManagedBy},
			OwnerReferences: []metav1.OwnerReference{{
				APIVersion: podipcv1alpha1.GroupVersion.String(), Kind: "Channel", Name: "feed", UID: owner,
				Controller: ptr.To(true), BlockOwnerDeletion: ptr.To(true),
			}},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   eps,
		Ports:       ports,
	}
}

var peerPorts = []discoveryv1.EndpointPort{
	{Name: ptr.To("other"), Port: ptr.To[int32](9000), Protocol: ptr.To(corev1.ProtocolTCP)},
	{Name: ptr.To(podipcv1alpha1.PeerPortName), Port: ptr.To[int32](7801), Protocol: ptr.To(corev1.ProtocolTCP)},
}

// pod returns the endpoint of pod name (UID "uid-"+name) at ip.
func pod(name, ip string, c discoveryv1.EndpointConditions) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{
		Addresses:  []string{ip},
		Conditions: c,
		TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: testNamespace, Name: name, UID: types.UID("uid-" + name)},
		NodeName:   ptr.To("node-1"),
	}
}

func member(name, ip string, port int, ready, serving, terminating bool) discovery.Member {
	return discovery.Member{Namespace: testNamespace, Name: name, UID: "uid-" + name, IP: ip, PeerPort: port,
		Ready: ready, Serving: serving, Terminating: terminating}
}

// TestSnapshotMembers feeds real EndpointSlices, as the informer holds them (unstructured),
// to the snapshot, which decodes them into the sidecar's own endpointSlice type: this
// checks that type against the real one as well as the member rules.
func TestSnapshotMembers(t *testing.T) {
	ready := discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)}
	tests := map[string]struct {
		slices []*discoveryv1.EndpointSlice
		want   []discovery.Member
	}{
		"ready members, sorted by name, with the slice's peer port": {
			slices: []*discoveryv1.EndpointSlice{slice("s1", feedUID, peerPorts,
				pod("b", "10.0.0.2", ready), pod("a", "10.0.0.1", ready))},
			want: []discovery.Member{member("a", "10.0.0.1", 7801, true, true, false), member("b", "10.0.0.2", 7801, true, true, false)},
		},
		"no podipc-peer port: the well-known one": {
			slices: []*discoveryv1.EndpointSlice{slice("s1", feedUID, peerPorts[:1], pod("a", "10.0.0.1", ready))},
			want:   []discovery.Member{member("a", "10.0.0.1", podipcv1alpha1.PeerPort, true, true, false)},
		},
		"unknown conditions: ready and serving": {
			slices: []*discoveryv1.EndpointSlice{slice("s1", feedUID, peerPorts, pod("a", "10.0.0.1", discoveryv1.EndpointConditions{}))},
			want:   []discovery.Member{member("a", "10.0.0.1", 7801, true, true, false)},
		},
		"not ready, serving unknown: not serving": {
			slices: []*discoveryv1.EndpointSlice{slice("s1", feedUID, peerPorts, pod("a", "10.0.0.1", discoveryv1.EndpointConditions{Ready: ptr.To(false)}))},
			want:   []discovery.Member{member("a", "10.0.0.1", 7801, false, false, false)},
		},
		"terminating and still serving": {
			slices: []*discoveryv1.EndpointSlice{slice("s1", feedUID, peerPorts, pod("a", "10.0.0.1",
				discoveryv1.EndpointConditions{Ready: ptr.To(false), Serving: ptr.To(true), Terminating: ptr.To(true)}))},
			want: []discovery.Member{member("a", "10.0.0.1", 7801, false, true, true)},
		},
		"a pod in two slices is listed once": {
			slices: []*discoveryv1.EndpointSlice{
				slice("s1", feedUID, peerPorts, pod("a", "10.0.0.1", ready)),
				slice("s2", feedUID, peerPorts, pod("a", "10.0.0.1", ready), pod("b", "10.0.0.2", ready)),
			},
			want: []discovery.Member{member("a", "10.0.0.1", 7801, true, true, false), member("b", "10.0.0.2", 7801, true, true, false)},
		},
		"endpoints without a pod or an address are skipped": {
			slices: []*discoveryv1.EndpointSlice{slice("s1", feedUID, peerPorts,
				discoveryv1.Endpoint{Addresses: []string{"10.0.0.9"}, Conditions: ready},
				discoveryv1.Endpoint{Addresses: []string{"10.0.0.8"}, Conditions: ready, TargetRef: &corev1.ObjectReference{Kind: "Node", Name: "n", UID: "uid-n"}},
				discoveryv1.Endpoint{Addresses: []string{}, Conditions: ready, TargetRef: &corev1.ObjectReference{Kind: "Pod", Name: "c", UID: "uid-c"}},
				pod("a", "10.0.0.1", ready))},
			want: []discovery.Member{member("a", "10.0.0.1", 7801, true, true, false)},
		},
		"the published service account and receive-only flag": {
			slices: []*discoveryv1.EndpointSlice{annotated(slice("s1", feedUID, peerPorts, pod("a", "10.0.0.1", ready), pod("b", "10.0.0.2", ready)),
				`{"uid-a":{"serviceAccount":"feeder"},"uid-b":{"serviceAccount":"reader","receiveOnly":true}}`)},
			want: []discovery.Member{
				withAccess(member("a", "10.0.0.1", 7801, true, true, false), "feeder", false),
				withAccess(member("b", "10.0.0.2", 7801, true, true, false), "reader", true),
			},
		},
		// A hand-edited (or foreign) annotation must not read as "no restriction published":
		// the slice is ignored, the other slice's members stay.
		"a slice whose published members cannot be decoded is ignored": {
			slices: []*discoveryv1.EndpointSlice{
				annotated(slice("s1", feedUID, peerPorts, pod("a", "10.0.0.1", ready)), `{"uid-a":{"receiveOnly":"yes"}}`),
				slice("s2", feedUID, peerPorts, pod("b", "10.0.0.2", ready)),
			},
			want: []discovery.Member{member("b", "10.0.0.2", 7801, true, true, false)},
		},
		"a slice of an earlier Channel of the same name is ignored": {
			slices: []*discoveryv1.EndpointSlice{
				slice("old", "uid-earlier", peerPorts, pod("x", "10.0.0.7", ready)),
				slice("s1", feedUID, peerPorts, pod("a", "10.0.0.1", ready)),
			},
			want: []discovery.Member{member("a", "10.0.0.1", 7801, true, true, false)},
		},
		"an owner that is not the controller does not count": {
			slices: []*discoveryv1.EndpointSlice{func() *discoveryv1.EndpointSlice {
				es := slice("s1", feedUID, peerPorts, pod("a", "10.0.0.1", ready))
				es.OwnerReferences[0].Controller = nil
				return es
			}()},
		},
		"only the first controller reference counts": {
			slices: []*discoveryv1.EndpointSlice{func() *discoveryv1.EndpointSlice {
				es := slice("s1", "uid-other", peerPorts, pod("a", "10.0.0.1", ready))
				es.OwnerReferences = append(es.OwnerReferences, metav1.OwnerReference{
					APIVersion: podipcv1alpha1.GroupVersion.String(), Kind: "Channel", Name: "feed", UID: feedUID, Controller: ptr.To(true)})
				return es
			}()},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			st := snapshotOf(t, tc.slices)
			ch, ok := st.Channels["feed"]
			if !ok {
				t.Fatalf("channel feed absent from %+v", st)
			}
			if !slices.Equal(ch.Members, tc.want) {
				t.Errorf("members:\n got %+v\nwant %+v", ch.Members, tc.want)
			}
		})
	}
}

// snapshotOf returns the snapshot of a Source serving channel feed (UID feedUID), with
// the informers' stores holding the Channel and slices.
func snapshotOf(t *testing.T, eps []*discoveryv1.EndpointSlice) discovery.State {
	t.Helper()
	feed := &podipcv1alpha1.Channel{
		TypeMeta:   metav1.TypeMeta{APIVersion: podipcv1alpha1.GroupVersion.String(), Kind: "Channel"},
		ObjectMeta: metav1.ObjectMeta{Namespace: testNamespace, Name: "feed", UID: feedUID},
		Spec:       podipcv1alpha1.ChannelSpec{LocalPort: 7300},
	}
	// Informers that are never run: only their stores are used.
	chInf := cache.NewSharedIndexInformer(&cache.ListWatch{}, &unstructured.Unstructured{}, 0, cache.Indexers{})
	if err := chInf.GetStore().Add(toUnstructured(t, feed)); err != nil {
		t.Fatal(err)
	}
	store := cache.NewStore(cache.MetaNamespaceKeyFunc)
	for _, es := range eps {
		if err := store.Add(toUnstructured(t, es)); err != nil {
			t.Fatal(err)
		}
	}
	s := &Source{Namespace: testNamespace, Channels: []string{"feed"}, Log: testr.New(t)}
	return s.snapshot(map[string]cache.SharedIndexInformer{"feed": chInf}, store)
}

func toUnstructured(t *testing.T, obj apiruntime.Object) *unstructured.Unstructured {
	t.Helper()
	m, err := apiruntime.DefaultUnstructuredConverter.ToUnstructured(obj)
	if err != nil {
		t.Fatal(err)
	}
	return &unstructured.Unstructured{Object: m}
}

// annotated sets the slice's podipc.dev/members annotation to raw.
func annotated(es *discoveryv1.EndpointSlice, raw string) *discoveryv1.EndpointSlice {
	es.Annotations = map[string]string{podipcv1alpha1.MembersAnnotation: raw}
	return es
}

// withAccess is m with the published service account and receive-only flag.
func withAccess(m discovery.Member, sa string, receiveOnly bool) discovery.Member {
	m.ServiceAccount, m.ReceiveOnly = sa, receiveOnly
	return m
}
