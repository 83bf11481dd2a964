package v1alpha1

import (
	"slices"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Well-known names shared by the controller, the webhook and the sidecar (docs/design.md §3.1).
const (
	// ChannelLabel is set on every EndpointSlice of a channel; its value is the Channel name.
	ChannelLabel = "podipc.dev/channel"
	// InjectedLabel marks a pod the webhook injected the sidecar into.
	InjectedLabel = "podipc.dev/injected"
	// SidecarContainerName is the name of the injected sidecar container.
	SidecarContainerName = "podipc-sidecar"
	// ChannelsEnv is the sidecar's env var listing the pod's channels, comma-separated.
	ChannelsEnv = "PODIPC_CHANNELS"
	// PeerPort is the sidecar-to-sidecar port, bound on the pod IP.
	PeerPort = 7701
	// PeerPortName names PeerPort in EndpointSlices and container ports.
	PeerPortName = "podipc-peer"
	// AdminPort serves /healthz, /readyz and /metrics, bound on the pod IP.
	AdminPort = 7702
	// ManagedBy is the value of the endpointslice.kubernetes.io/managed-by label on the
	// EndpointSlices the podipc controller publishes.
	ManagedBy = "controller.podipc.dev"
	// MembersAnnotation, on each EndpointSlice of a channel, holds what the controller
	// decided about each endpoint's pod beyond its address: its service account and
	// whether it may only receive (the format is pkg/discovery's PublishedMembers). An
	// EndpointSlice is written by the controller alone (members may only read), so a
	// sidecar trusts it as it trusts the endpoints themselves (docs/security.md).
	MembersAnnotation = "podipc.dev/members"
)

// Delivery says how a line is spread over a channel's members.
//
// +kubebuilder:validation:Enum=Broadcast;AnyOne
type Delivery string

const (
	// DeliveryBroadcast delivers each line to every other connection on the channel.
	DeliveryBroadcast Delivery = "Broadcast"
	// DeliveryAnyOne delivers each line to the connections of one member pod, round robin.
	DeliveryAnyOne Delivery = "AnyOne"
)

// OverflowPolicy says what a sidecar does when a receiver's queue is full.
//
// +kubebuilder:validation:Enum=WaitThenDrop;Block;Disconnect
type OverflowPolicy string

const (
	// OverflowWaitThenDrop waits up to maxWait once per overflow episode, then drops
	// (counted) for that receiver until its queue is below half.
	OverflowWaitThenDrop OverflowPolicy = "WaitThenDrop"
	// OverflowBlock applies lossless backpressure, a slow receiver slowing the channel,
	// for at most maxBlock per overflow episode; then it drops (counted block_timeout)
	// for that receiver until its queue is below half.
	OverflowBlock OverflowPolicy = "Block"
	// OverflowDisconnect disconnects a slow local reader (NATS's slow-consumer rule).
	OverflowDisconnect OverflowPolicy = "Disconnect"
)

// ChannelSpec configures a channel. Every field has a default, so an empty spec is valid.
//
// +kubebuilder:validation:XValidation:rule="!has(self.overflow) || !has(self.overflow.queueBytes) || !has(self.maxMessageBytes) || self.overflow.queueBytes >= self.maxMessageBytes",message="overflow.queueBytes must be at least maxMessageBytes: a queue smaller than one message could never accept it"
type ChannelSpec struct {
	// LocalPort is the TCP port, on 127.0.0.1 in every member pod, where apps read and
	// write lines. It cannot change once set: running apps are connected to it.
	//
	// +kubebuilder:default=7000
	// +kubebuilder:validation:Minimum=1024
	// +kubebuilder:validation:Maximum=65535
	// +kubebuilder:validation:XValidation:rule="self != 7701 && self != 7702",message="localPort must not be 7701 or 7702: the sidecar uses them for its peer and admin ports"
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="localPort is immutable: apps are connected to it; create a new Channel instead"
	// +optional
	LocalPort int32 `json:"localPort,omitempty"`

	// Delivery says how a line is spread: Broadcast to every other connection, or AnyOne
	// to the connections of one member pod chosen round robin.
	//
	// +kubebuilder:default=Broadcast
	// +optional
	Delivery Delivery `json:"delivery,omitempty"`

	// MaxMessageBytes bounds one line (or node-ipc message); a longer one ends the
	// connection that sent it.
	//
	// +kubebuilder:default=65536
	// +kubebuilder:validation:Minimum=16
	// +kubebuilder:validation:Maximum=16777216
	// +optional
	MaxMessageBytes int32 `json:"maxMessageBytes,omitempty"`

	// Overflow bounds each receiver's queue and says what happens when it is full.
	//
	// +kubebuilder:default={}
	// +optional
	Overflow Overflow `json:"overflow,omitempty"`

	// Access restricts who may join: without it, every pod of the namespace that names the
	// channel is a member (an open channel).
	//
	// +optional
	Access *Access `json:"access,omitempty"`
}

// Access says which pods may be members of a channel, by their service account, and which
// of them may only receive.
//
// +kubebuilder:validation:XValidation:rule="!has(self.receiveOnly) || self.receiveOnly.all(a, a in self.serviceAccounts)",message="every access.receiveOnly account must also be listed in access.serviceAccounts"
type Access struct {
	// ServiceAccounts are the service accounts (in the Channel's namespace) whose pods may
	// be members. The webhook rejects a pod of any other account that names the channel,
	// and the controller never publishes one.
	//
	// +listType=set
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=256
	// +kubebuilder:validation:items:MaxLength=253
	// +kubebuilder:validation:items:Pattern=`^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$`
	ServiceAccounts []string `json:"serviceAccounts"`

	// ReceiveOnly are those of ServiceAccounts whose pods may only receive: receivers drop
	// (and count, reason not_permitted) every line such a member sends. Enforced by the
	// receiving sidecar from the peer's workload certificate once peer links use mutual
	// TLS.
	//
	// +listType=set
	// +kubebuilder:validation:MaxItems=256
	// +kubebuilder:validation:items:MaxLength=253
	// +optional
	ReceiveOnly []string `json:"receiveOnly,omitempty"`
}

// Allows reports whether pods of serviceAccount may be members under a (nil: open).
func (a *Access) Allows(serviceAccount string) bool {
	if a == nil {
		return true
	}
	for _, sa := range a.ServiceAccounts {
		if sa == serviceAccount {
			return true
		}
	}
	return false
}

// MayOnlyReceive reports whether pods of serviceAccount may only receive under a (nil:
// open, where every member may send).
func (a *Access) MayOnlyReceive(serviceAccount string) bool {
	return a != nil && slices.Contains(a.ReceiveOnly, serviceAccount)
}

// Values of ChannelStatus.Access.
const (
	// AccessOpen: the channel has no spec.access; every pod of the namespace may join.
	AccessOpen = "Open"
	// AccessRestricted: only the service accounts of spec.access may join.
	AccessRestricted = "Restricted"
)

// Overflow is a channel's bounded-queue policy.
type Overflow struct {
	// Policy is what happens when a receiver's queue is full.
	//
	// +kubebuilder:default=WaitThenDrop
	// +optional
	Policy OverflowPolicy `json:"policy,omitempty"`

	// MaxWait is how long WaitThenDrop waits for room, once per overflow episode, before
	// dropping; a Go duration such as "100ms", at most 10s.
	//
	// +kubebuilder:default="100ms"
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:MaxLength=32
	// +kubebuilder:validation:Pattern=`^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$`
	// +kubebuilder:validation:XValidation:rule="duration(self) <= duration('10s')",message="overflow.maxWait must be at most 10s"
	// +optional
	MaxWait *metav1.Duration `json:"maxWait,omitempty"`

	// MaxBlock is how long Block holds a sender back for one receiver whose queue stays
	// full, once per overflow episode; then the lines for that receiver are dropped
	// (counted block_timeout) until its queue is below half, so that a member that is
	// gone but still listed cannot stall the channel for ever. A Go duration such as
	// "30s", at least 1ms and at most 1h; only Block uses it.
	//
	// +kubebuilder:default="30s"
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:MaxLength=32
	// +kubebuilder:validation:Pattern=`^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$`
	// +kubebuilder:validation:XValidation:rule="duration(self) >= duration('1ms') && duration(self) <= duration('1h')",message="overflow.maxBlock must be within 1ms and 1h"
	// +optional
	MaxBlock *metav1.Duration `json:"maxBlock,omitempty"`

	// QueueBytes bounds the bytes queued for one receiver.
	//
	// +kubebuilder:default=1048576
	// +kubebuilder:validation:Minimum=1024
	// +kubebuilder:validation:Maximum=268435456
	// +optional
	QueueBytes int32 `json:"queueBytes,omitempty"`
}

// ConditionReady says whether the controller has published the channel's membership
// (EndpointSlices and the members' read access) for its current spec.
const ConditionReady = "Ready"

// Reasons of the Ready condition.
const (
	// ReasonMembershipPublished: the EndpointSlices and RBAC match the member pods.
	ReasonMembershipPublished = "MembershipPublished"
	// ReasonPublishFailed: writing the EndpointSlices or RBAC failed; the message says
	// which, and the controller retries.
	ReasonPublishFailed = "PublishFailed"
)

// ChannelStatus is what the controller observed of a channel.
type ChannelStatus struct {
	// ObservedGeneration is the generation the controller last published successfully.
	//
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`

	// Members counts the pods (with an IP) whose sidecar names this channel.
	//
	// +kubebuilder:default=0
	// +optional
	Members int32 `json:"members"`

	// ReadyMembers counts the members whose pod is Ready and not terminating.
	//
	// +kubebuilder:default=0
	// +optional
	ReadyMembers int32 `json:"readyMembers"`

	// Access is Open (no spec.access: any pod of the namespace may join) or Restricted.
	//
	// +kubebuilder:validation:Enum=Open;Restricted
	// +optional
	Access string `json:"access,omitempty"`

	// NotPermitted counts the pods that name the channel but whose service account
	// spec.access does not list: they are not published as members.
	//
	// +optional
	NotPermitted int32 `json:"notPermitted,omitempty"`

	// Conditions are the observations of the channel's state; see ConditionReady.
	//
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// Channel is a named group of pods that exchange lines through their podipc sidecars.
// Pods join it through the podipc.dev/channels annotation; the controller publishes its
// members as EndpointSlices labelled podipc.dev/channel=<name>.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName={chan,ch},categories=podipc
// +kubebuilder:printcolumn:name="Members",type=integer,JSONPath=`.status.members`
// +kubebuilder:printcolumn:name="Ready",type=integer,JSONPath=`.status.readyMembers`
// +kubebuilder:printcolumn:name="Delivery",type=string,JSONPath=`.spec.delivery`
// +kubebuilder:printcolumn:name="Port",type=integer,JSONPath=`.spec.localPort`
// +kubebuilder:printcolumn:name="Access",type=string,JSONPath=`.status.access`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
// +kubebuilder:validation:XValidation:rule="self.metadata.name.size() <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",message="a Channel name must be a DNS label (lower case letters, digits and '-', at most 63 characters): it is used as a label value and in socket paths"
type Channel struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// Spec configures the channel.
	//
	// +kubebuilder:default={}
	// +optional
	Spec ChannelSpec `json:"spec,omitempty"`

	// Status is written by the controller. Defaulted to {} so that a Channel the
	// controller has not counted yet reads 0 members rather than nothing.
	//
	// +kubebuilder:default={}
	// +optional
	Status ChannelStatus `json:"status,omitempty"`
}

// ChannelList is a list of Channels.
//
// +kubebuilder:object:root=true
type ChannelList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Channel `json:"items"`
}
