// Package refs_test checks hack/verify-refs.sh, the `make verify` step that keeps the tree
// from citing documents outside the repository or paths of one machine.
package refs_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// script is hack/verify-refs.sh, found from this file so the test runs from any directory.
func script(t *testing.T) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot locate the test file")
	}
	return filepath.Join(filepath.Dir(file), "..", "..", "hack", "verify-refs.sh")
}

// tree makes a git work tree holding files (path → content) and returns its path.
func tree(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	git(t, dir, "init", "-q")
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func git(t *testing.T, dir string, args ...string) {
	t.Helper()
	if out, err := exec.Command("git", append([]string{"-C", dir}, args...)...).CombinedOutput(); err != nil {
		t.Fatalf("git %v: %v\n%s", args, err, out)
	}
}

// verify runs the script on dir and returns its output and whether it passed.
func verify(t *testing.T, dir string) (string, bool) {
	t.Helper()
	out, err := exec.Command("bash", script(t), dir).CombinedOutput()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatal(err)
	}
	return string(out), err == nil
}

// The strings the check refuses are built from pieces, so this file passes it too.
var (
	design  = "DES" + "IGN"
	machine = "/wo" + "rk/"
)

func TestVerifyRefsRefusesOutsideReferences(t *testing.T) {
	tests := map[string]struct {
		file, line string
	}{
		"design section":          {"pkg/x/x.go", "// The names of " + design + " §2.\n"},
		"design section no space": {"docs/a.md", "as " + design + "§5 says\n"},
		"design file":             {"e2e/app.cjs", "// The journey of " + design + ".md §1\n"},
		"shared notes":            {"hack/node/up.sh", "# see ../" + "shared/notes/real-node.md\n"},
		"machine path":            {"docs/performance.md", "loadtest -sidecar=" + machine + "main/bin/podipc-sidecar\n"},
		"home directory":          {"Makefile", "GOBIN := /ho" + "me/alice/go/bin\n"},
		"untracked file":          {"new.md", "see " + design + " §3\n"},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			dir := tree(t, map[string]string{
				"README.md": "Cite docs/design.md §3 and hack/node/README.md.\n",
				tt.file:     "package line\n" + tt.line,
			})
			if name != "untracked file" {
				git(t, dir, "add", "-A")
			}
			out, ok := verify(t, dir)
			if ok {
				t.Fatalf("verify-refs passed a tree whose %s says %q", tt.file, tt.line)
			}
			if !strings.Contains(out, tt.file+":2:") {
				t.Errorf("output does not name %s:2:\n%s", tt.file, out)
			}
			if strings.Contains(out, "README.md:") {
				t.Errorf("output names README.md, whose references are in the repository:\n%s", out)
			}
		})
	}
}

func TestVerifyRefsPassesRepositoryReferences(t *testing.T) {
	dir := tree(t, map[string]string{
		"README.md":      "See docs/design.md §8.1, docs/guarantees.md and hack/node/README.md.\n",
		"pkg/x/x.go":     "// The design (docs/design.md §3.2); node-ipc's default root is /tmp/.\n",
		"Dockerfile":     "RUN --mount=type=cache,target=/root/go/pkg/mod go mod download\n",
		"docs/design.md": "## 3. The public contract\n",
	})
	// Ignored files (bin/, caches) are not the tree's text.
	if err := os.WriteFile(filepath.Join(dir, ".gitignore"), []byte("/bin\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bin", "notes"), []byte(machine+"main/bin\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, ok := verify(t, dir); !ok {
		t.Fatalf("verify-refs refused a tree that cites only its own files:\n%s", out)
	}
}

// TestRepositoryHasNoOutsideReferences is the check on this repository itself, so that
// `go test ./...` catches what `make verify` would.
func TestRepositoryHasNoOutsideReferences(t *testing.T) {
	if out, ok := verify(t, filepath.Join(filepath.Dir(script(t)), "..")); !ok {
		t.Fatalf("the repository cites documents outside it or machine paths:\n%s", out)
	}
}
