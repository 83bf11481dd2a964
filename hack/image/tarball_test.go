package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
)

// readTar returns every entry of a tarball by name, with its header.
func readTar(t *testing.T, data []byte) (map[string][]byte, map[string]*tar.Header, []string) {
	t.Helper()
	files := map[string][]byte{}
	headers := map[string]*tar.Header{}
	var order []string
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("reading tar: %v", err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		files[hdr.Name] = b
		headers[hdr.Name] = hdr
		order = append(order, hdr.Name)
	}
	return files, headers, order
}

func digest(b []byte) string {
	d := sha256.Sum256(b)
	return hex.EncodeToString(d[:])
}

func writeTemp(t *testing.T, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestWriteIsConsistentDockerSaveLayout(t *testing.T) {
	for _, arch := range []string{"amd64", "arm64"} {
		t.Run(arch, func(t *testing.T) {
			bin := writeTemp(t, "app", []byte("#!not really a binary\n"))
			s := &Spec{
				Tag:        "podipc/sidecar:e2e",
				Arch:       arch,
				Entrypoint: []string{"/podipc-sidecar"},
				Cmd:        []string{"--v=2"},
				User:       "65532:65532",
				Files: []File{
					{Source: bin, Path: "/podipc-sidecar"},
					{Source: bin, Path: "/usr/local/bin/podipc"},
				},
				CheckELF: true,
			}
			var out bytes.Buffer
			if err := Write(&out, s); err != nil {
				t.Fatal(err)
			}
			files, _, order := readTar(t, out.Bytes())
			if !slices.IsSorted(order) {
				t.Errorf("outer entries not sorted: %v", order)
			}

			var manifest []manifestEntry
			if err := json.Unmarshal(files["manifest.json"], &manifest); err != nil {
				t.Fatalf("manifest.json: %v", err)
			}
			if len(manifest) != 1 || len(manifest[0].Layers) != 1 {
				t.Fatalf("manifest = %+v, want one image with one layer", manifest)
			}
			m := manifest[0]
			if !slices.Equal(m.RepoTags, []string{"podipc/sidecar:e2e"}) {
				t.Errorf("RepoTags = %v", m.RepoTags)
			}
			cfgBytes, ok := files[m.Config]
			if !ok {
				t.Fatalf("config %q named by the manifest is missing", m.Config)
			}
			if got := digest(cfgBytes) + ".json"; got != m.Config {
				t.Errorf("config file %s has digest %s", m.Config, got)
			}
			layer, ok := files[m.Layers[0]]
			if !ok {
				t.Fatalf("layer %q named by the manifest is missing", m.Layers[0])
			}

			var cfg imageConfig
			if err := json.Unmarshal(cfgBytes, &cfg); err != nil {
				t.Fatal(err)
			}
			if want := []string{"sha256:" + digest(layer)}; !slices.Equal(cfg.RootFS.DiffIDs, want) {
				t.Errorf("diff_ids = %v, want %v (the layer's digest)", cfg.RootFS.DiffIDs, want)
			}
			if cfg.Architecture != arch || cfg.OS != "linux" {
				t.Errorf("platform = %s/%s, want linux/%s", cfg.OS, cfg.Architecture, arch)
			}
			if !slices.Equal(cfg.Config.Entrypoint, []string{"/podipc-sidecar"}) ||
				!slices.Equal(cfg.Config.Cmd, []string{"--v=2"}) {
				t.Errorf("entrypoint/cmd = %v %v", cfg.Config.Entrypoint, cfg.Config.Cmd)
			}
			if cfg.Config.User != "65532:65532" {
				t.Errorf("user = %q", cfg.Config.User)
			}
			if !slices.Equal(cfg.Config.Env, []string{defaultEnv}) {
				t.Errorf("env = %v", cfg.Config.Env)
			}

			lfiles, lhdrs, lorder := readTar(t, layer)
			wantOrder := []string{"podipc-sidecar", "usr/", "usr/local/", "usr/local/bin/", "usr/local/bin/podipc"}
			if !slices.Equal(lorder, wantOrder) {
				t.Errorf("layer entries = %v, want %v", lorder, wantOrder)
			}
			if string(lfiles["podipc-sidecar"]) != "#!not really a binary\n" {
				t.Errorf("file content changed")
			}
			for name, h := range lhdrs {
				if !h.ModTime.Equal(epoch) || h.Uid != 0 || h.Gid != 0 {
					t.Errorf("%s: mtime %v uid %d gid %d, want fixed epoch and root", name, h.ModTime, h.Uid, h.Gid)
				}
				if h.Typeflag == tar.TypeReg && h.Mode != 0o755 {
					t.Errorf("%s: mode %o, want 755 (executable)", name, h.Mode)
				}
			}
		})
	}
}

func TestWriteIsDeterministic(t *testing.T) {
	bin := writeTemp(t, "app", []byte("payload"))
	build := func() []byte {
		var out bytes.Buffer
		s := &Spec{Tag: "x/y:1", Arch: "amd64", Entrypoint: []string{"/b"}, Files: []File{
			{Source: bin, Path: "/b"}, {Source: bin, Path: "/a/c"},
		}}
		if err := Write(&out, s); err != nil {
			t.Fatal(err)
		}
		return out.Bytes()
	}
	if !bytes.Equal(build(), build()) {
		t.Fatal("two builds of the same spec differ")
	}
}

func TestValidateRejects(t *testing.T) {
	bin := writeTemp(t, "app", []byte("x"))
	ok := func() Spec {
		return Spec{Tag: "a/b:1", Arch: "amd64", Entrypoint: []string{"/b"}, Files: []File{{Source: bin, Path: "/b"}}}
	}
	tests := map[string]struct {
		mutate func(*Spec)
		want   string
	}{
		"no tag":         {func(s *Spec) { s.Tag = "a/b" }, "explicit tag"},
		"latest":         {func(s *Spec) { s.Tag = "a/b:latest" }, "explicit tag"},
		"unknown arch":   {func(s *Spec) { s.Arch = "s390x" }, "amd64 or arm64"},
		"no entrypoint":  {func(s *Spec) { s.Entrypoint = nil }, "entrypoint"},
		"no files":       {func(s *Spec) { s.Files = nil }, "at least one file"},
		"relative path":  {func(s *Spec) { s.Files[0].Path = "b" }, "absolute"},
		"unclean path":   {func(s *Spec) { s.Files[0].Path = "/a/../b" }, "absolute"},
		"duplicate path": {func(s *Spec) { s.Files = append(s.Files, s.Files[0]) }, "twice"},
		"missing source": {func(s *Spec) { s.Files[0].Source = "/nonexistent/podipc" }, "no such file"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			s := ok()
			tc.mutate(&s)
			err := Write(io.Discard, &s)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// TestCheckELFRefusesOtherArchitecture builds a real static binary for the host and checks that
// it is accepted for its own architecture and refused for the other.
func TestCheckELFRefusesOtherArchitecture(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a binary")
	}
	other := map[string]string{"amd64": "arm64", "arm64": "amd64"}[runtime.GOARCH]
	if other == "" {
		t.Skipf("host architecture %s is not an image architecture", runtime.GOARCH)
	}
	bin := filepath.Join(t.TempDir(), "pause")
	build := exec.Command("go", "build", "-o", bin, "./pause")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	for arch, wantErr := range map[string]bool{runtime.GOARCH: false, other: true} {
		s := &Spec{Tag: "p/pause:1", Arch: arch, Entrypoint: []string{"/pause"},
			Files: []File{{Source: bin, Path: "/pause"}}, CheckELF: true}
		err := Write(io.Discard, s)
		if (err != nil) != wantErr {
			t.Errorf("arch %s: err = %v, want error %v", arch, err, wantErr)
		}
	}
}
