package chart_test

import (
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
)

// TestControllerFlagsExist builds cmd/podipc-controller and checks that every flag the
// chart passes it is one the binary defines: a renamed flag would crash-loop the
// controller on a real cluster, which the API-server-only install test cannot see.
func TestControllerFlagsExist(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "podipc-controller")
	build := exec.CommandContext(t.Context(), "go", "build", "-o", bin, "./cmd/podipc-controller")
	build.Dir = repoRoot
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the controller: %v\n%s", err, out)
	}
	// The flag package prints every flag as "  -name type" on -help.
	out, _ := exec.CommandContext(t.Context(), bin, "-help").CombinedOutput()
	defined := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^\s+-([a-z0-9-]+)`).FindAllStringSubmatch(string(out), -1) {
		defined[m[1]] = true
	}
	if !defined["leader-elect"] {
		t.Fatalf("could not read the controller's flags from -help:\n%s", out)
	}
	for name, values := range valueSets {
		dep := into[appsv1.Deployment](t, render(t, values).get(t, "Deployment", "podipc-controller"))
		for _, arg := range dep.Spec.Template.Spec.Containers[0].Args {
			flag, _, _ := strings.Cut(strings.TrimLeft(arg, "-"), "=")
			if !defined[flag] {
				t.Errorf("%s: the chart passes %q, which podipc-controller does not define", name, arg)
			}
		}
	}
}
