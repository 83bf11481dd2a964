//go:build linux

package podnet_test

import (
	"net"
	"net/netip"
	"testing"

	"github.com/podipc/podipc/internal/podnet"
	"github.com/podipc/podipc/internal/testenv"
)

func TestMain(m *testing.M) {
	testenv.EnterPodNetwork() // podnet.Run, then podnet.Setup in the child
	m.Run()
}

// TestPodIPs checks what the demo and the sidecar tests rely on: any address of the pod
// range can be listened on, and a connection from another pod IP arrives from that IP.
func TestPodIPs(t *testing.T) {
	if !podnet.Inside() {
		t.Fatal("the test binary is not in the pod network")
	}
	for name, tc := range map[string]struct{ server, client string }{
		"node and pod":  {server: podnet.NodeIP, client: "10.244.0.11"},
		"two pods":      {server: "10.244.7.1", client: "10.244.7.2"},
		"edge of range": {server: "10.244.255.254", client: "10.244.0.2"},
	} {
		t.Run(name, func(t *testing.T) {
			if !netip.MustParsePrefix(podnet.CIDR).Contains(netip.MustParseAddr(tc.server)) {
				t.Fatalf("%s is not in %s", tc.server, podnet.CIDR)
			}
			var lc net.ListenConfig
			l, err := lc.Listen(t.Context(), "tcp", net.JoinHostPort(tc.server, "0"))
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = l.Close() }()
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(tc.client)}}
			c, err := d.DialContext(t.Context(), "tcp", l.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = c.Close() }()
			s, err := l.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = s.Close() }()
			if got := s.RemoteAddr().(*net.TCPAddr).IP.String(); got != tc.client {
				t.Errorf("the connection arrived from %s, want %s", got, tc.client)
			}
		})
	}
}
