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

// allowlistPath is the allow-list of npm packages, relative to the repository root.
const allowlistPath = "hack/nodeipc/allowlist.txt"

// npmPackage is one exact release of an npm package: the key of the allow-list.
type npmPackage struct{ Name, Version string }

// allowlist maps every npm package the pins may install to its integrity hash.
type allowlist map[npmPackage]string

// loadAllowlist reads the committed allow-list of hack/nodeipc/allowlist.txt.
func loadAllowlist(root string) (allowlist, error) {
	raw, err := os.ReadFile(filepath.Join(root, allowlistPath))
	if err != nil {
		return nil, err
	}
	return parseAllowlist(string(raw))
}

// parseAllowlist parses "name version integrity" lines; # starts a comment.
func parseAllowlist(text string) (allowlist, error) {
	al := allowlist{}
	for i, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 3 || !strings.HasPrefix(f[2], "sha512-") {
			return nil, fmt.Errorf("%s:%d: want \"name version sha512-…\", got %q", allowlistPath, i+1, line)
		}
		al[npmPackage{f[0], f[1]}] = f[2]
	}
	return al, nil
}

// check refuses a package unless its exact name, version and integrity hash are on
// the allow-list. A deny-list of known malicious releases (node-ipc 9.2.2, 10.1.1-10.1.3
// and 11.x, the "peacenotwar" protestware) lets the next one through by construction;
// an allow-list refuses whatever nobody has reviewed, a tampered tarball included.
func (al allowlist) check(name, version, integrity string) error {
	want, ok := al[npmPackage{name, version}]
	switch {
	case !ok:
		return fmt.Errorf("refusing %s@%s: not on the allow-list %s", name, version, allowlistPath)
	case integrity != want:
		return fmt.Errorf("refusing %s@%s: integrity %q is not the allow-listed %q", name, version, integrity, want)
	}
	return nil
}

// checkLockfile applies the allow-list to every package a lockfile resolves, before
// anything is downloaded. npm ci then installs exactly these and verifies each tarball
// against the integrity the lockfile (and so the allow-list) holds.
func (al allowlist) checkLockfile(lock []byte) error {
	var parsed struct {
		LockfileVersion int `json:"lockfileVersion"`
		Packages        map[string]struct {
			Version   string `json:"version"`
			Integrity string `json:"integrity"`
			Resolved  string `json:"resolved"`
			Link      bool   `json:"link"`
		} `json:"packages"`
	}
	if err := json.Unmarshal(lock, &parsed); err != nil {
		return fmt.Errorf("parse package-lock.json: %w", err)
	}
	if parsed.LockfileVersion < 2 {
		return fmt.Errorf("refusing package-lock.json version %d: only versions 2 and 3 list every package", parsed.LockfileVersion)
	}
	for path, p := range parsed.Packages {
		if path == "" {
			continue // the pin itself
		}
		// Keys are install paths ("node_modules/a/node_modules/b").
		name := path
		if i := strings.LastIndex(path, "node_modules/"); i >= 0 {
			name = path[i+len("node_modules/"):]
		}
		if p.Link || (p.Resolved != "" && !strings.HasPrefix(p.Resolved, "https://registry.npmjs.org/")) {
			return fmt.Errorf("refusing %s: resolved outside the npm registry (%q)", path, p.Resolved)
		}
		if err := al.check(name, p.Version, p.Integrity); err != nil {
			return err
		}
	}
	return nil
}

// checkInstalled applies the allow-list to what npm actually put on disk: every
// package.json under node_modules, at any depth, must name an allow-listed release
// (the integrity npm verified is recorded as _integrity by older npm, and not at all by
// newer, so on disk the name and version are checked).
func (al allowlist) checkInstalled(dir string) error {
	versions := map[npmPackage]bool{}
	for k := range al {
		versions[k] = true
	}
	modules := filepath.Join(dir, "node_modules")
	n := 0
	err := filepath.WalkDir(modules, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Name() != "package.json" {
			return err
		}
		rel, _ := filepath.Rel(modules, filepath.Dir(path))
		rel = filepath.ToSlash(rel)
		name := rel
		if i := strings.LastIndex(rel, "node_modules/"); i >= 0 {
			name = rel[i+len("node_modules/"):]
		}
		if strings.Count(name, "/") > 1 || (strings.Contains(name, "/") && !strings.HasPrefix(name, "@")) {
			return nil // a package's own nested file (lib/package.json and the like)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		var m struct {
			Name    string `json:"name"`
			Version string `json:"version"`
		}
		if err := json.Unmarshal(data, &m); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		if m.Name != name || !versions[npmPackage{m.Name, m.Version}] {
			return fmt.Errorf("refusing the install: node_modules/%s holds %s@%s, which is not on the allow-list %s",
				rel, m.Name, m.Version, allowlistPath)
		}
		n++
		return nil
	})
	if err == nil && n == 0 {
		err = fmt.Errorf("no package installed under %s", modules)
	}
	return err
}

// TestNodeIPCAllowlist: the guard refuses, before npm runs, every package that is not on
// the allow-list by exact name, version and hash, however deep in the tree — the known
// malicious node-ipc releases, a version nobody reviewed, a right version whose tarball
// is not the one reviewed — and refuses an install that holds one; the committed pins pass.
func TestNodeIPCAllowlist(t *testing.T) {
	root := repoRoot(t)
	al, err := loadAllowlist(root)
	if err != nil {
		t.Fatal(err)
	}
	good := al[npmPackage{"node-ipc", "9.2.1"}]
	if good == "" {
		t.Fatal("node-ipc@9.2.1 is not on the allow-list")
	}
	lock := func(path, version, integrity string) []byte {
		return fmt.Appendf(nil, `{"lockfileVersion":3,"packages":{"":{},%q:{"version":%q,"integrity":%q}}}`, path, version, integrity)
	}
	tests := map[string]struct {
		lock    []byte
		message string
	}{
		"malicious 10.1.2 deep in the tree": {lock("node_modules/x/node_modules/node-ipc", "10.1.2", good), "not on the allow-list"},
		"malicious 9.2.2":                   {lock("node_modules/node-ipc", "9.2.2", good), "not on the allow-list"},
		"a future 11.x":                     {lock("node_modules/node-ipc", "11.1.0", good), "not on the allow-list"},
		"an unreviewed release":             {lock("node_modules/node-ipc", "9.2.3", good), "not on the allow-list"},
		"peacenotwar":                       {lock("node_modules/peacenotwar", "9.1.6", good), "not on the allow-list"},
		"the right version, another tarball": {lock("node_modules/node-ipc", "9.2.1",
			"sha512-"+strings.Repeat("A", 86)+"=="), "is not the allow-listed"},
		"the right version, no hash": {lock("node_modules/node-ipc", "9.2.1", ""), "is not the allow-listed"},
		"resolved from elsewhere": {[]byte(`{"lockfileVersion":3,"packages":{"":{},"node_modules/node-ipc":{"version":"9.2.1",` +
			`"integrity":"` + good + `","resolved":"https://evil.example/node-ipc-9.2.1.tgz"}}}`), "outside the npm registry"},
		"a v1 lockfile, which lists no tree": {[]byte(`{"lockfileVersion":1,"dependencies":{}}`), "version 1"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			err := al.checkLockfile(tc.lock)
			if err == nil {
				t.Fatalf("lockfile %s was accepted", tc.lock)
			}
			if !strings.Contains(err.Error(), tc.message) {
				t.Fatalf("refused with %q, want it to say %q", err, tc.message)
			}
		})
	}
	if err := al.checkLockfile(lock("node_modules/node-ipc", "9.2.1", good)); err != nil {
		t.Fatalf("an allow-listed package was refused: %v", err)
	}
	for _, p := range nodeIPCPackages {
		raw, err := os.ReadFile(filepath.Join(root, "hack/nodeipc/pkg", p.Dir, "package-lock.json"))
		if err != nil {
			t.Fatal(err)
		}
		if err := al.checkLockfile(raw); err != nil {
			t.Errorf("committed pin %s: %v", p.Dir, err)
		}
	}

	// On disk: an install into which a release nobody listed was slipped is refused.
	dir := t.TempDir()
	write := func(rel, body string) {
		path := filepath.Join(dir, "node_modules", filepath.FromSlash(rel), "package.json")
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("node-ipc", `{"name":"node-ipc","version":"9.2.1"}`)
	write("node-ipc/lib", `{"name":"not-a-package"}`)
	if err := al.checkInstalled(dir); err != nil {
		t.Fatalf("an allow-listed install was refused: %v", err)
	}
	write("node-ipc/node_modules/node-ipc", `{"name":"node-ipc","version":"10.1.1"}`)
	if err := al.checkInstalled(dir); err == nil || !strings.Contains(err.Error(), "10.1.1") {
		t.Fatalf("an install holding node-ipc@10.1.1 was accepted (%v)", err)
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
	al, err := loadAllowlist(root)
	if err != nil {
		return "", err
	}
	if err := al.checkLockfile(lock); err != nil {
		return "", err
	}
	sum := sha256.Sum256(append(append([]byte{}, manifest...), lock...))
	stamp := hex.EncodeToString(sum[:])
	const stampFile = ".podipc-pin-sha256"

	npmDir := filepath.Join(root, "bin", "npm")
	dest := filepath.Join(npmDir, p.Dir)
	if got, err := os.ReadFile(filepath.Join(dest, stampFile)); err == nil && string(got) == stamp {
		return dest, verifyInstalled(dest, p, al)
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
	if err := verifyInstalled(tmp, p, al); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(tmp, stampFile), []byte(stamp), 0o644); err != nil {
		return "", err
	}
	// Another process may have finished the same install meanwhile; it may be running
	// tests from it, so keep it rather than moving it away.
	if got, err := os.ReadFile(filepath.Join(dest, stampFile)); err == nil && string(got) == stamp {
		return dest, verifyInstalled(dest, p, al)
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
			return dest, verifyInstalled(dest, p, al)
		}
		return "", err
	}
	return dest, nil
}

// verifyInstalled checks what npm actually put on disk, not just what the lock says.
func verifyInstalled(dir string, p nodeIPCPackage, al allowlist) error {
	if err := al.checkInstalled(dir); err != nil {
		return err
	}
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
