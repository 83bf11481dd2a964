package main

import (
	"os/exec"
	"strings"
	"testing"
)

// forbidden are the packages kept out of the sidecar binary, by import path prefix, and
// why. The sidecar's idle RSS grows with its binary, even in static mode: start-up
// touches pages all over it (package initialisation), and the kernel maps the pages
// around each one it faults in. The goal is ≤ 15 MB idle (docs/performance.md).
var forbidden = map[string]string{
	"k8s.io/api/": "the typed API packages: k8s.io/api/discovery/v1 with the core/v1 it imports added 4.4 MB " +
		"to the binary and 0.7 to 1.8 MB to idle RSS; decode the informers' unstructured objects into local types " +
		"(as pkg/discovery/kube does for EndpointSlices) and spell out constants, tied to the real ones by a test",
	"k8s.io/client-go/kubernetes": "the typed clientset registers every built-in API group at start-up " +
		"(29.4 MiB against 18.8 MiB idle in Kubernetes mode when it was replaced by the dynamic client)",
}

// TestDependencies fails if a package the sidecar must not link comes back into its
// import graph (through a new import here or in the packages it uses).
func TestDependencies(t *testing.T) {
	out, err := exec.CommandContext(t.Context(), "go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	linked := map[string][]string{}
	for pkg := range strings.FieldsSeq(string(out)) {
		for prefix := range forbidden {
			if strings.HasPrefix(pkg, prefix) {
				linked[prefix] = append(linked[prefix], pkg)
			}
		}
	}
	for prefix, pkgs := range linked {
		t.Errorf("podipc-sidecar links %s; keep %s* out of it: %s.\n"+
			"What imports them: go list -deps -f '{{.ImportPath}}: {{.Imports}}' ./cmd/podipc-sidecar | grep %s",
			strings.Join(pkgs, ", "), prefix, forbidden[prefix], prefix)
	}
}
