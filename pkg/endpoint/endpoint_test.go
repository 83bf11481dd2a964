package endpoint_test

import (
	"os"
	"path/filepath"
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
