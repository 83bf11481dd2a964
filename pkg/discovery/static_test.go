package discovery

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
)

const staticYAML = `channels:
  orders:
    localPort: 7000
    delivery: AnyOne
    overflow: {policy: Block, maxWait: 250ms, maxBlock: 2s}
    members:
      - {namespace: demo, name: pod-a, uid: uid-a, ip: 127.0.0.2, ready: true, serving: true}
#more
  other:
    members: []
`

func TestParseStatic(t *testing.T) {
	st, err := ParseStatic([]byte(staticYAML), []string{"orders", "missing"})
	if err != nil {
		t.Fatal(err)
	}
	ch, ok := st.Channels["orders"]
	if !ok || len(st.Channels) != 1 {
		t.Fatalf("channels = %v; want only orders (named and existing)", st.Channels)
	}
	want := Spec{LocalPort: 7000, Delivery: AnyOne, MaxMessageBytes: DefaultMaxMessageBytes,
		Overflow: Overflow{Policy: Block, MaxWait: 250 * time.Millisecond, MaxBlock: 2 * time.Second, QueueBytes: DefaultQueueBytes}}
	if ch.Spec != want {
		t.Fatalf("spec = %+v, want %+v", ch.Spec, want)
	}
	if m := ch.Members[0]; m.PeerPort != DefaultPeerPort || m.UID != "uid-a" || !m.Ready {
		t.Fatalf("member = %+v", m)
	}
	for name, bad := range map[string]string{
		"unknown field": "channels: {orders: {locaPort: 7000}}",
		"bad policy":    "channels: {orders: {overflow: {policy: Sometimes}}}",
		"sidecar port":  "channels: {orders: {localPort: 7701}}",
	} {
		if _, err := ParseStatic([]byte(bad), []string{"orders"}); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// TestStaticReload: a change of the file produces a new snapshot; a broken file keeps
// the last one.
func TestStaticReload(t *testing.T) {
	path := filepath.Join(t.TempDir(), "static.yaml")
	if err := os.WriteFile(path, []byte(staticYAML), 0o644); err != nil {
		t.Fatal(err)
	}
	s := NewStatic(path, []string{"orders"}, logr.Discard())
	s.PollInterval = 10 * time.Millisecond
	ctx, cancel := context.WithCancel(t.Context())
	updates := make(chan State, 10)
	done := make(chan error)
	go func() { done <- s.Run(ctx, func(st State) { updates <- st }) }()
	if st := <-updates; len(st.Channels["orders"].Members) != 1 {
		t.Fatalf("first snapshot: %+v", st)
	}
	write := func(content string) {
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	write("not: [valid")
	s.Reload()
	time.Sleep(50 * time.Millisecond)
	write(strings.Replace(staticYAML, "#more",
		"      - {namespace: demo, name: pod-b, uid: uid-b, ip: 127.0.0.3, ready: true, serving: true}", 1))
	select {
	case st := <-updates:
		if len(st.Channels["orders"].Members) != 2 {
			t.Fatalf("after the change: %+v", st)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no snapshot after the file changed")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
