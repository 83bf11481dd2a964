package discovery

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"reflect"
	"time"

	"github.com/go-logr/logr"
	"sigs.k8s.io/yaml"

	"github.com/podipc/podipc/internal/wake"
)

// StaticFile is the format of the static configuration file (YAML or JSON).
type StaticFile struct {
	Channels map[string]StaticChannel `json:"channels"`
}

// StaticChannel is one channel of a static configuration file.
type StaticChannel struct {
	LocalPort       int            `json:"localPort,omitempty"`
	Delivery        Delivery       `json:"delivery,omitempty"`
	MaxMessageBytes int            `json:"maxMessageBytes,omitempty"`
	Overflow        StaticOverflow `json:"overflow,omitempty"`
	Members         []StaticMember `json:"members,omitempty"`
}

// StaticOverflow is the overflow section of a static channel.
type StaticOverflow struct {
	Policy     OverflowPolicy `json:"policy,omitempty"`
	MaxWait    string         `json:"maxWait,omitempty"`
	MaxBlock   string         `json:"maxBlock,omitempty"`
	QueueBytes int            `json:"queueBytes,omitempty"`
}

// StaticMember is one member pod of a static channel.
type StaticMember struct {
	Namespace   string `json:"namespace"`
	Name        string `json:"name"`
	UID         string `json:"uid"`
	IP          string `json:"ip"`
	PeerPort    int    `json:"peerPort,omitempty"`
	Ready       bool   `json:"ready"`
	Serving     bool   `json:"serving"`
	Terminating bool   `json:"terminating,omitempty"`
	// ServiceAccount, if set, is the account a peer's certificate must name.
	ServiceAccount string `json:"serviceAccount,omitempty"`
	// ReceiveOnly says receivers drop the member's lines on this channel (not_permitted).
	ReceiveOnly bool `json:"receiveOnly,omitempty"`
}

// DefaultPeerPort is the sidecar's peer port.
const DefaultPeerPort = 7701

// Static is a Source reading a file. The file is re-read every PollInterval (and at
// once after Reload, which the sidecar calls on SIGHUP); a snapshot is published when
// its parsed content changes. Write the file atomically (write a temporary file, then
// rename it over the old one) so the poller never sees it half written. A file that cannot be read or parsed is logged and the
// last good snapshot stays in force, like an unreachable API server.
type Static struct {
	// Path is the file to read.
	Path string
	// Channels are the channels the pod names (PODIPC_CHANNELS); others are ignored.
	Channels []string
	// PollInterval defaults to one second.
	PollInterval time.Duration
	Log          logr.Logger

	reload chan struct{}
}

// NewStatic returns a static source for path, serving only the named channels.
func NewStatic(path string, channels []string, log logr.Logger) *Static {
	return &Static{Path: path, Channels: channels, PollInterval: time.Second, Log: log, reload: make(chan struct{}, 1)}
}

// Reload makes Run re-read the file now.
func (s *Static) Reload() {
	wake.Up(s.reload)
}

// Run implements Source. The first snapshot is published once the file has been read
// successfully; until then Run keeps retrying.
func (s *Static) Run(ctx context.Context, update func(State)) error {
	var lastRaw []byte
	var last *State
	t := time.NewTicker(s.PollInterval)
	defer t.Stop()
	for {
		raw, err := os.ReadFile(s.Path)
		switch {
		case err != nil:
			s.Log.Error(err, "Reading static discovery file failed; keeping the last snapshot", "path", s.Path)
		case len(bytes.TrimSpace(raw)) == 0:
			// Most likely a writer truncated the file and has not written it yet;
			// replace the file atomically (write and rename) to avoid the window.
			s.Log.Info("Static discovery file is empty; keeping the last snapshot", "path", s.Path)
		case last == nil || !bytes.Equal(raw, lastRaw):
			st, err := ParseStatic(raw, s.Channels)
			if err != nil {
				s.Log.Error(err, "Parsing static discovery file failed; keeping the last snapshot", "path", s.Path)
				break
			}
			lastRaw = raw
			if last == nil || !reflect.DeepEqual(*last, st) {
				last = &st
				update(st)
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-s.reload:
		}
	}
}

// ParseStatic parses a static file into the snapshot of the named channels.
func ParseStatic(raw []byte, names []string) (State, error) {
	var f StaticFile
	if err := yaml.UnmarshalStrict(raw, &f); err != nil {
		return State{}, fmt.Errorf("static discovery: %w", err)
	}
	st := State{Channels: map[string]Channel{}}
	for _, name := range names {
		sc, ok := f.Channels[name]
		if !ok {
			continue
		}
		spec := Spec{LocalPort: sc.LocalPort, Delivery: sc.Delivery, MaxMessageBytes: sc.MaxMessageBytes,
			Overflow: Overflow{Policy: sc.Overflow.Policy, QueueBytes: sc.Overflow.QueueBytes}}
		if sc.Overflow.MaxWait != "" {
			d, err := time.ParseDuration(sc.Overflow.MaxWait)
			if err != nil {
				return State{}, fmt.Errorf("static discovery: channel %s: maxWait: %w", name, err)
			}
			spec.Overflow.MaxWait = d
		}
		if sc.Overflow.MaxBlock != "" {
			d, err := time.ParseDuration(sc.Overflow.MaxBlock)
			if err != nil {
				return State{}, fmt.Errorf("static discovery: channel %s: maxBlock: %w", name, err)
			}
			spec.Overflow.MaxBlock = d
		}
		spec = spec.WithDefaults()
		if err := validateSpec(spec); err != nil {
			return State{}, fmt.Errorf("static discovery: channel %s: %w", name, err)
		}
		ch := Channel{Name: name, Spec: spec}
		for _, m := range sc.Members {
			if m.PeerPort == 0 {
				m.PeerPort = DefaultPeerPort
			}
			ch.Members = append(ch.Members, Member(m))
		}
		st.Channels[name] = ch
	}
	return st, nil
}

func validateSpec(s Spec) error {
	switch {
	case s.Delivery != Broadcast && s.Delivery != AnyOne:
		return fmt.Errorf("delivery %q is not Broadcast or AnyOne", s.Delivery)
	case s.Overflow.Policy != WaitThenDrop && s.Overflow.Policy != Block && s.Overflow.Policy != Disconnect:
		return fmt.Errorf("overflow policy %q is not WaitThenDrop, Block or Disconnect", s.Overflow.Policy)
	case s.Overflow.MaxWait < 0 || s.Overflow.MaxWait > 10*time.Second:
		return fmt.Errorf("maxWait %s is not within 0-10s", s.Overflow.MaxWait)
	case s.Overflow.MaxBlock < time.Millisecond || s.Overflow.MaxBlock > time.Hour:
		return fmt.Errorf("maxBlock %s is not within 1ms-1h", s.Overflow.MaxBlock)
	case s.LocalPort < 1024 || s.LocalPort > 65535 || s.LocalPort == 7701 || s.LocalPort == 7702:
		return fmt.Errorf("localPort %d is not within 1024-65535 or is a sidecar port", s.LocalPort)
	case s.MaxMessageBytes < 1 || s.MaxMessageBytes > 16<<20:
		return fmt.Errorf("maxMessageBytes %d is not within 1-16MiB", s.MaxMessageBytes)
	}
	return nil
}
