// Package discovery tells a sidecar which channels its pod serves, how each channel is
// configured, and which other pods are members of it.
//
// A Source produces full snapshots (State) rather than deltas, so a consumer can diff the
// new snapshot against what it runs and apply only the change; a missed or repeated
// snapshot is harmless. Two implementations exist: a static file, for running sidecars
// without Kubernetes, and the Kubernetes one, which reads Channels and EndpointSlices.
package discovery

import (
	"context"
	"time"
)

// Delivery says how a line is spread over a channel's members.
type Delivery string

const (
	// Broadcast delivers each line to every other connection on the channel.
	Broadcast Delivery = "Broadcast"
	// AnyOne delivers each line to one member pod, chosen round robin.
	AnyOne Delivery = "AnyOne"
)

// OverflowPolicy says what happens when a receiver's queue is full.
type OverflowPolicy string

const (
	// WaitThenDrop waits up to MaxWait once per overflow episode, then drops (counted)
	// for that receiver until its queue is below half.
	WaitThenDrop OverflowPolicy = "WaitThenDrop"
	// Block applies backpressure to the sender, losslessly for up to MaxBlock per
	// overflow episode; then it drops (counted block_timeout) for that receiver until
	// its queue is below half.
	Block OverflowPolicy = "Block"
	// Disconnect disconnects a slow local reader.
	Disconnect OverflowPolicy = "Disconnect"
)

// Defaults for the fields of Spec, matching the Channel CRD's defaults.
const (
	DefaultLocalPort       = 7000
	DefaultMaxMessageBytes = 64 << 10
	DefaultQueueBytes      = 1 << 20
	DefaultMaxWait         = 100 * time.Millisecond
	DefaultMaxBlock        = 30 * time.Second
)

// Spec is a channel's configuration, the sidecar's view of Channel.spec.
type Spec struct {
	LocalPort       int
	Delivery        Delivery
	MaxMessageBytes int
	Overflow        Overflow
}

// Overflow is the bounded-queue policy of a channel.
type Overflow struct {
	Policy  OverflowPolicy
	MaxWait time.Duration
	// MaxBlock bounds how long Block holds a sender back for one receiver.
	MaxBlock   time.Duration
	QueueBytes int
}

// WithDefaults returns s with every zero field set to its default.
func (s Spec) WithDefaults() Spec {
	if s.LocalPort == 0 {
		s.LocalPort = DefaultLocalPort
	}
	if s.Delivery == "" {
		s.Delivery = Broadcast
	}
	if s.MaxMessageBytes == 0 {
		s.MaxMessageBytes = DefaultMaxMessageBytes
	}
	if s.Overflow.Policy == "" {
		s.Overflow.Policy = WaitThenDrop
	}
	if s.Overflow.MaxWait == 0 {
		s.Overflow.MaxWait = DefaultMaxWait
	}
	if s.Overflow.MaxBlock == 0 {
		s.Overflow.MaxBlock = DefaultMaxBlock
	}
	if s.Overflow.QueueBytes == 0 {
		s.Overflow.QueueBytes = DefaultQueueBytes
	}
	return s
}

// Member is one pod of a channel, with the identity a peer link must present.
type Member struct {
	Namespace string
	Name      string
	UID       string
	IP        string
	PeerPort  int
	// Ready, Serving and Terminating mirror the EndpointSlice endpoint conditions.
	Ready       bool
	Serving     bool
	Terminating bool
	// ServiceAccount is the service account the pod runs as, as the controller publishes
	// it (docs/security.md "Who may join and send"): a peer's workload certificate must
	// name this one. Empty means unknown (a controller of an earlier release, or a static
	// file that does not say): then it is not compared.
	ServiceAccount string
	// ReceiveOnly says the member may only receive on this channel (its account is in the
	// Channel's spec.access.receiveOnly, as the controller publishes it): receivers drop
	// every line it sends here, counted as not_permitted.
	ReceiveOnly bool
}

// Channel is one channel the pod belongs to: its spec and all of its members. Members
// may include the sidecar's own pod; consumers exclude themselves by UID.
type Channel struct {
	Name    string
	Spec    Spec
	Members []Member
}

// State is a full snapshot: every channel the pod names that exists, by name. A channel
// the pod names but that does not exist (yet) is absent.
type State struct {
	Channels map[string]Channel
}

// Source produces snapshots of the channels a sidecar serves.
type Source interface {
	// Run calls update with a full snapshot, first once the source has synced and then
	// whenever something changes, until ctx ends. update is never called concurrently.
	// When the backing store is unreachable, Run keeps the last snapshot and retries.
	Run(ctx context.Context, update func(State)) error
}

// PublishedMember is what the controller publishes about one member pod next to its
// EndpointSlice endpoint (the slice's podipc.dev/members annotation, keyed by pod UID):
// what a sidecar checks a peer's certificate against and what it lets the peer send.
type PublishedMember struct {
	ServiceAccount string `json:"serviceAccount"`
	ReceiveOnly    bool   `json:"receiveOnly,omitempty"`
}

// PublishedMembers is the podipc.dev/members annotation: the published members of one
// EndpointSlice by pod UID. It is JSON, whose object keys encoding/json writes sorted,
// so an unchanged membership encodes to the same bytes and the slice is not rewritten.
type PublishedMembers map[string]PublishedMember
