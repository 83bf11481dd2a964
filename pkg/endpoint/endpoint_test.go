package endpoint_test

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/go-logr/logr"

	"github.com/podipc/podipc/pkg/discovery"
	"github.com/podipc/podipc/pkg/endpoint"
	"github.com/podipc/podipc/pkg/router"
)

// TestNodeIPCSocketMode: in a volume the kubelet gave the pod's fsGroup (set-group-ID,
// a non-root group), the node-ipc socket is open to its owner and that group only;
// without one, to every user, since the pod's containers may run as any of them.
func TestNodeIPCSocketMode(t *testing.T) {
	tests := map[string]struct {
		fsGroup bool
		want    os.FileMode
	}{
		"volume with an fsGroup":    {true, 0o660},
		"volume without an fsGroup": {false, 0o666},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			dir, err := os.MkdirTemp("", "pi") // short: socket paths are limited to 108 bytes
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = os.RemoveAll(dir) })
			if tc.fsGroup {
				if os.Getuid() != 0 {
					t.Skip("giving a directory another group needs root")
				}
				if err := os.Chown(dir, -1, 2000); err != nil {
					t.Fatal(err)
				}
				if err := os.Chmod(dir, 0o777|os.ModeSetgid); err != nil {
					t.Fatal(err)
				}
			}
			r := router.New(logr.Discard(), nil)
			t.Cleanup(r.Close)
			ch := r.Ensure("orders", discovery.Spec{})
			path := filepath.Join(dir, "app.orders")
			ep, err := endpoint.ListenNodeIPC(ch, path, endpoint.Options{}, logr.Discard())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = ep.Close() })
			fi, err := os.Lstat(path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != tc.want {
				t.Fatalf("socket mode %v, want a socket with %v", fi.Mode(), tc.want)
			}
		})
	}
}

// TestNodeIPCSocketLeftBehind: the socket file of a sidecar that died is replaced; one
// that another endpoint still serves is not taken over, and the error names the channel.
func TestNodeIPCSocketLeftBehind(t *testing.T) {
	dir, err := os.MkdirTemp("", "pi") // short: socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	path := filepath.Join(dir, "app.orders")
	var lc net.ListenConfig
	dead, err := lc.Listen(t.Context(), "unix", path)
	if err != nil {
		t.Fatal(err)
	}
	dead.(*net.UnixListener).SetUnlinkOnClose(false)
	_ = dead.Close() // the file stays, nobody answers on it

	r := router.New(logr.Discard(), nil)
	t.Cleanup(r.Close)
	ch := r.Ensure("orders", discovery.Spec{})
	ep, err := endpoint.ListenNodeIPC(ch, path, endpoint.Options{}, logr.Discard())
	if err != nil {
		t.Fatalf("listen over a dead sidecar's socket: %v", err)
	}
	t.Cleanup(func() { _ = ep.Close() })
	go func() { _ = ep.Start(t.Context()) }()

	other, err := endpoint.ListenNodeIPC(ch, path, endpoint.Options{}, logr.Discard())
	if err == nil {
		_ = other.Close()
		t.Fatal("a second endpoint took over a socket that is being served")
	}
	if !strings.Contains(err.Error(), "orders") {
		t.Errorf("error %q does not name the channel", err)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("the first endpoint no longer answers: %v", err)
	}
	_ = c.Close()
}
