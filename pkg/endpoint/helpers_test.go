package endpoint

import (
	"net"
	"testing"
	"time"

	"github.com/go-logr/logr"

	"github.com/podipc/podipc/pkg/router"
)

// serve starts ep until the test ends.
func serve(t *testing.T, ep *Endpoint) {
	t.Helper()
	t.Cleanup(func() { _ = ep.Close() })
	go func() { _ = ep.Start(t.Context()) }()
}

// listenLines serves a line port of ch on loopback until the test ends.
func listenLines(t *testing.T, ch *router.Channel) *Endpoint {
	t.Helper()
	ep, err := ListenLines(ch, "127.0.0.1:0", Options{}, logr.Discard())
	if err != nil {
		t.Fatal(err)
	}
	serve(t, ep)
	return ep
}

// dial connects an app to ep, closed when the test ends.
func dial(t *testing.T, ep *Endpoint) net.Conn {
	t.Helper()
	conn, err := net.Dial(ep.Addr().Network(), ep.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// waitAttached waits until channel of r has n app connections attached: lines delivered
// before that find no connection.
func waitAttached(t *testing.T, r *router.Router, channel string, n int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); r.Presence()[channel] < n; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d apps attached to %s", r.Presence()[channel], n, channel)
		}
	}
}
