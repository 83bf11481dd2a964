package ipc_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// nodeIPCPackage is one pinned node-ipc release the compatibility tests run against.
type nodeIPCPackage struct {
	// Dir names both the pin under hack/nodeipc/pkg/ and the install under bin/npm/.
	Dir string
	// Name is the npm package name, which is also its path under node_modules/.
	Name string
	// Version is the exact version the pin must install.
	Version string
}

// nodeIPCPackages are the releases docs/design.md §10 promises wire compatibility with. Each is
// pinned by a committed package.json and package-lock.json and installed with npm ci.
var nodeIPCPackages = []nodeIPCPackage{
	{Dir: "node-ipc-9.2.1", Name: "node-ipc", Version: "9.2.1"},
	{Dir: "node-ipc-10.1.0", Name: "node-ipc", Version: "10.1.0"},
	{Dir: "achrinza-node-ipc-10.1.11", Name: "@achrinza/node-ipc", Version: "10.1.11"},
}

// checkNodeIPCVersion refuses the node-ipc releases that shipped malicious code: 9.2.2 and
// 10.1.1-10.1.3 (the "peacenotwar" protestware that overwrote files) and every 11.x. The
// pins never resolve to them; this guard keeps a careless re-pin from installing one.
func checkNodeIPCVersion(name, version string) error {
	if name != "node-ipc" {
		return nil
	}
	switch {
	case version == "9.2.2", version == "10.1.1", version == "10.1.2", version == "10.1.3",
		strings.HasPrefix(version, "11."):
		return fmt.Errorf("refusing node-ipc@%s: a known malicious release", version)
	}
	return nil
}

// checkLockfile applies checkNodeIPCVersion to every package a lockfile resolves, before
// anything is downloaded.
func checkLockfile(lock []byte) error {
	var parsed struct {
		Packages map[string]struct {
			Version string `json:"version"`
		} `json:"packages"`
	}
	if err := json.Unmarshal(lock, &parsed); err != nil {
		return fmt.Errorf("parse package-lock.json: %w", err)
	}
	for path, p := range parsed.Packages {
		// Keys are install paths ("node_modules/a/node_modules/b"); the root is "".
		name := path
		if i := strings.LastIndex(path, "node_modules/"); i >= 0 {
			name = path[i+len("node_modules/"):]
		}
		if name == "peacenotwar" {
			return errors.New("refusing a lockfile that resolves peacenotwar (node-ipc protestware)")
		}
		if err := checkNodeIPCVersion(name, p.Version); err != nil {
			return err
		}
	}
	return nil
}

func TestNodeIPCVersionGuard(t *testing.T) {
	for _, v := range []string{"9.2.2", "10.1.1", "10.1.2", "10.1.3", "11.0.0", "11.1.0"} {
		if checkNodeIPCVersion("node-ipc", v) == nil {
			t.Errorf("node-ipc@%s accepted; it is a malicious release", v)
		}
	}
	for _, p := range nodeIPCPackages {
		if err := checkNodeIPCVersion(p.Name, p.Version); err != nil {
			t.Errorf("pinned %s@%s refused: %v", p.Name, p.Version, err)
		}
	}
	bad := []byte(`{"packages":{"":{},"node_modules/x/node_modules/node-ipc":{"version":"10.1.2"}}}`)
	if checkLockfile(bad) == nil {
		t.Error("a lockfile resolving node-ipc@10.1.2 deep in the tree was accepted")
	}
	root := repoRoot(t)
	for _, p := range nodeIPCPackages {
		lock, err := os.ReadFile(filepath.Join(root, "hack/nodeipc/pkg", p.Dir, "package-lock.json"))
		if err != nil {
			t.Fatal(err)
		}
		if err := checkLockfile(lock); err != nil {
			t.Errorf("committed pin %s: %v", p.Dir, err)
		}
	}
}

var (
	nodeIPCInstallOnce sync.Once
	nodeIPCModules     map[string]string
	errNodeIPCInstall  error
)

// requireNodeIPC skips the test when node is absent, and otherwise returns, per pin Dir,
// the directory to require() for that package, installing the pins on first use. The
// install runs once per test binary; two test binaries (or two worktrees sharing bin/)
// racing is safe because each installs into a fresh temporary directory and renames it
// into place, and the loser keeps the winner's identical install.
func requireNodeIPC(t *testing.T) map[string]string {
	t.Helper()
	if _, err := exec.LookPath("node"); err != nil {
		t.Skip("node is not installed: skipping the node-ipc compatibility tests (hack/ci-deps.sh installs it)")
	}
	nodeIPCInstallOnce.Do(func() {
		root, err := findRepoRoot()
		if err != nil {
			errNodeIPCInstall = err
			return
		}
		nodeIPCModules = map[string]string{}
		for _, p := range nodeIPCPackages {
			dir, err := installNodeIPC(root, p)
			if err != nil {
				errNodeIPCInstall = fmt.Errorf("install %s@%s: %w", p.Name, p.Version, err)
				return
			}
			nodeIPCModules[p.Dir] = filepath.Join(dir, "node_modules", filepath.FromSlash(p.Name))
		}
	})
	if errNodeIPCInstall != nil {
		t.Fatal(errNodeIPCInstall)
	}
	return nodeIPCModules
}

// installNodeIPC makes bin/npm/<Dir> hold the pinned install and returns that directory.
// A stamp file records the hash of the pin, so an edited pin is reinstalled and an
// unchanged one costs nothing.
func installNodeIPC(root string, p nodeIPCPackage) (string, error) {
	pin := filepath.Join(root, "hack/nodeipc/pkg", p.Dir)
	manifest, err := os.ReadFile(filepath.Join(pin, "package.json"))
	if err != nil {
		return "", err
	}
	lock, err := os.ReadFile(filepath.Join(pin, "package-lock.json"))
	if err != nil {
		return "", err
	}
	if err := checkLockfile(lock); err != nil {
		return "", err
	}
	sum := sha256.Sum256(append(append([]byte{}, manifest...), lock...))
	stamp := hex.EncodeToString(sum[:])
	const stampFile = ".podipc-pin-sha256"

	npmDir := filepath.Join(root, "bin", "npm")
	dest := filepath.Join(npmDir, p.Dir)
	if got, err := os.ReadFile(filepath.Join(dest, stampFile)); err == nil && string(got) == stamp {
		return dest, verifyInstalled(dest, p)
	}
	if _, err := exec.LookPath("npm"); err != nil {
		return "", errors.New("npm is not installed (hack/ci-deps.sh installs it)")
	}
	if err := os.MkdirAll(npmDir, 0o755); err != nil {
		return "", err
	}
	// npm ci treats a --prefix reached through a symlink (bin/ may be one, shared between
	// worktrees) as a linked package and refuses the lockfile, so give it the real path.
	if npmDir, err = filepath.EvalSymlinks(npmDir); err != nil {
		return "", err
	}
	dest = filepath.Join(npmDir, p.Dir)
	tmp, err := os.MkdirTemp(npmDir, "."+p.Dir+"-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp) //nolint:errcheck // best effort; after a successful rename it is gone already
	// MkdirTemp makes it private; the install is shared by everyone using bin/.
	if err := os.Chmod(tmp, 0o755); err != nil {
		return "", err
	}
	for name, data := range map[string][]byte{"package.json": manifest, "package-lock.json": lock} {
		if err := os.WriteFile(filepath.Join(tmp, name), data, 0o644); err != nil {
			return "", err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	// --ignore-scripts: nothing from the registry runs at install time.
	cmd := exec.CommandContext(ctx, "npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--prefix", tmp)
	cmd.Dir = tmp
	cmd.Env = append(os.Environ(), "npm_config_update_notifier=false")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("npm ci: %w\n%s", err, out)
	}
	if err := verifyInstalled(tmp, p); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(tmp, stampFile), []byte(stamp), 0o644); err != nil {
		return "", err
	}
	// Another process may have finished the same install meanwhile; it may be running
	// tests from it, so keep it rather than moving it away.
	if got, err := os.ReadFile(filepath.Join(dest, stampFile)); err == nil && string(got) == stamp {
		return dest, verifyInstalled(dest, p)
	}
	// Move a stale install aside first: rename onto a non-empty directory fails.
	if _, err := os.Stat(dest); err == nil {
		old := tmp + "-old"
		if err := os.Rename(dest, old); err == nil {
			defer os.RemoveAll(old) //nolint:errcheck // best effort cleanup of the stale install
		}
	}
	if err := os.Rename(tmp, dest); err != nil {
		// Another process renamed its install in first; use it if it is the same pin.
		if got, rerr := os.ReadFile(filepath.Join(dest, stampFile)); rerr == nil && string(got) == stamp {
			return dest, verifyInstalled(dest, p)
		}
		return "", err
	}
	return dest, nil
}

// verifyInstalled checks what npm actually put on disk, not just what the lock says.
func verifyInstalled(dir string, p nodeIPCPackage) error {
	data, err := os.ReadFile(filepath.Join(dir, "node_modules", filepath.FromSlash(p.Name), "package.json"))
	if err != nil {
		return err
	}
	var m struct {
		Version string `json:"version"`
	}
	if err := json.Unmarshal(data, &m); err != nil {
		return err
	}
	if err := checkNodeIPCVersion(p.Name, m.Version); err != nil {
		return err
	}
	if m.Version != p.Version {
		return fmt.Errorf("installed %s@%s, pinned %s", p.Name, m.Version, p.Version)
	}
	return nil
}

// repoRoot finds the module root from the test's working directory (the package dir).
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := findRepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return root
}

func findRepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.mod not found above the test's directory")
		}
		dir = parent
	}
}
