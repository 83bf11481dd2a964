// Package chart_test tests the Helm chart in charts/podipc with the pinned helm binary
// (bin/helm): lint, rendering for every values combination that matters, the values
// schema, and install/upgrade/uninstall against the real test API server.
package chart_test

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	"github.com/podipc/podipc/internal/testenv"
)

const (
	release   = "podipc"
	namespace = "podipc-system"
)

var (
	repoRoot = testenv.RepoRoot()
	chartDir = filepath.Join(repoRoot, "charts", "podipc")
)

// helmBin returns the pinned helm; its absence fails the test (never a silent skip).
func helmBin(t *testing.T) string {
	t.Helper()
	p := filepath.Join(repoRoot, "bin", "helm")
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("helm not found at %s: run 'make bin/helm' (or 'make test', which builds it first)", p)
	}
	return p
}

// helm runs the pinned helm with an isolated home, returning stdout, or stderr as the error.
func helm(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), helmBin(t), args...)
	home := t.TempDir()
	cmd.Env = append(os.Environ(),
		"HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"),
		"HELM_DATA_HOME="+filepath.Join(home, "data"),
	)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), errors.New(strings.TrimSpace(stderr.String() + "\n" + err.Error()))
	}
	return stdout.String(), nil
}

// setArgs turns {"a.b": "x"} into --set-json flags, so values keep their JSON types.
func setArgs(values map[string]string) []string {
	var args []string
	for k, v := range values {
		args = append(args, "--set-json", k+"="+v)
	}
	return args
}

// render runs `helm template` and returns the objects, test hooks included.
func render(t *testing.T, values map[string]string) objects {
	t.Helper()
	out, err := helm(t, append([]string{"template", release, chartDir, "--namespace", namespace}, setArgs(values)...)...)
	if err != nil {
		t.Fatalf("helm template: %v", err)
	}
	return parseObjects(t, out)
}

func parseObjects(t *testing.T, manifest string) objects {
	t.Helper()
	dec := utilyaml.NewYAMLOrJSONDecoder(strings.NewReader(manifest), 4096)
	var objs objects
	for {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				return objs
			}
			t.Fatalf("parsing the rendered chart: %v", err)
		}
		if len(m) == 0 {
			continue
		}
		objs = append(objs, &unstructured.Unstructured{Object: m})
	}
}

type objects []*unstructured.Unstructured

// get returns the object of that kind and name, failing the test if it is missing.
func (o objects) get(t *testing.T, kind, name string) *unstructured.Unstructured {
	t.Helper()
	if u := o.find(kind, name); u != nil {
		return u
	}
	t.Fatalf("the chart rendered no %s %q; it rendered %v", kind, name, o.names())
	return nil
}

func (o objects) find(kind, name string) *unstructured.Unstructured {
	for _, u := range o {
		if u.GetKind() == kind && u.GetName() == name {
			return u
		}
	}
	return nil
}

func (o objects) kinds(kind string) objects {
	var out objects
	for _, u := range o {
		if u.GetKind() == kind {
			out = append(out, u)
		}
	}
	return out
}

func (o objects) names() []string {
	var out []string
	for _, u := range o {
		out = append(out, u.GetKind()+"/"+u.GetName())
	}
	return out
}

// into converts a rendered object into its typed form.
func into[T any](t *testing.T, u *unstructured.Unstructured) *T {
	t.Helper()
	var v T
	if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(u.Object, &v, true); err != nil {
		t.Fatalf("%s/%s does not convert to %T: %v", u.GetKind(), u.GetName(), v, err)
	}
	return &v
}
