package main

import (
	"bufio"
	"bytes"
	"testing"

	"github.com/podipc/podipc/pkg/peer"
)

// TestHelloFrameIsTheSidecars: the impostor's handcrafted HELLO is byte for byte the one a
// sidecar sends (pkg/peer), so the e2e replay is refused for what it is, not for a
// malformed frame; and the impostor reads a REFUSE as the sidecar writes it.
func TestHelloFrameIsTheSidecars(t *testing.T) {
	want := peer.Hello{MinVersion: 1, MaxVersion: 1, Channels: []string{"chat", "work"},
		Pod: peer.Identity{Namespace: "ns", Name: "talk-0", UID: "0b6e0c5e-uid", Incarnation: 1}}.Frame()
	if got := helloFrame("ns", "talk-0", "0b6e0c5e-uid", []string{"chat", "work"}); !bytes.Equal(got, want) {
		t.Fatalf("HELLO\n got %x\nwant %x", got, want)
	}
	refuse := peer.ReasonFrame(peer.FrameRefuse, "this sidecar requires mutual TLS")
	if got := answer(bufio.NewReader(bytes.NewReader(refuse))); got != "refused: this sidecar requires mutual TLS" {
		t.Errorf("answer to REFUSE: %q", got)
	}
}
