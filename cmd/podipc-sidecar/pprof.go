//go:build pprof

package main

// Profiling for measurements only (the scale tool, docs/performance.md): built with
// `go build -tags pprof`, a sidecar started with PODIPC_PPROF=1 serves net/http/pprof
// on a free loopback port it logs at start. The default build leaves it out, so that no
// image or chart ships a profiling endpoint and the binary stays small (deps_test.go).

import (
	"context"
	"fmt"
	"net"
	"net/http"
	_ "net/http/pprof" //nolint:gosec // loopback only, in a test-only build
	"os"
)

func init() {
	if os.Getenv("PODIPC_PPROF") != "1" {
		return
	}
	ln, err := new(net.ListenConfig).Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "pprof:", err)
		return
	}
	fmt.Fprintf(os.Stderr, "pprof listening on http://%s/debug/pprof/\n", ln.Addr())
	go func() { _ = http.Serve(ln, nil) }() //nolint:gosec // no timeouts needed for a local profiler
}
