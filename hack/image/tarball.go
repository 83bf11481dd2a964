package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"regexp"
	"sort"
	"strings"
	"time"
)

// epoch is the modification time of every tar entry and the image's creation time, so the same
// inputs always give the same bytes (and therefore the same image ID).
var epoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

// defaultEnv is what a FROM-scratch image gets when no --env is given.
const defaultEnv = "PATH=/usr/local/bin:/usr/bin:/bin"

// archMachines maps the supported --arch values to the ELF machine a static binary for them has.
var archMachines = map[string]elf.Machine{
	"amd64": elf.EM_X86_64,
	"arm64": elf.EM_AARCH64,
}

// tagPattern accepts "repo:tag" where repo may carry a registry host and path components. An
// explicit tag is required: the kubelet treats ":latest" as "always pull", and there is no registry.
var tagPattern = regexp.MustCompile(`^[a-z0-9]+([._/:-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`)

// File is one regular file of the image: its bytes come from Source on the build machine and it
// is placed at Path (absolute) inside the image.
type File struct {
	Source string
	Path   string
	Mode   int64
}

// Spec describes a single-layer image built FROM scratch.
type Spec struct {
	Tag        string
	Arch       string
	Entrypoint []string
	Cmd        []string
	User       string
	Env        []string
	Files      []File
	// CheckELF refuses files that are ELF binaries for another architecture, the mistake that
	// otherwise shows up only as "exec format error" in a pod on the other machine.
	CheckELF bool
}

// Validate reports the first problem with the spec, before anything is written.
func (s *Spec) Validate() error {
	if !tagPattern.MatchString(s.Tag) {
		return fmt.Errorf("tag %q: want repo:tag with an explicit tag", s.Tag)
	}
	if strings.HasSuffix(s.Tag, ":latest") {
		return fmt.Errorf("tag %q: use an explicit tag, the kubelet always pulls :latest", s.Tag)
	}
	if _, ok := archMachines[s.Arch]; !ok {
		return fmt.Errorf("arch %q: want amd64 or arm64", s.Arch)
	}
	if len(s.Entrypoint) == 0 {
		return errors.New("an entrypoint is required (a scratch image has no shell)")
	}
	if len(s.Files) == 0 {
		return errors.New("at least one file is required")
	}
	seen := map[string]bool{}
	for _, f := range s.Files {
		if !path.IsAbs(f.Path) || path.Clean(f.Path) != f.Path || f.Path == "/" {
			return fmt.Errorf("image path %q: want a clean absolute file path", f.Path)
		}
		if seen[f.Path] {
			return fmt.Errorf("image path %q given twice", f.Path)
		}
		seen[f.Path] = true
	}
	return nil
}

// manifestEntry is one element of a "docker save" manifest.json.
type manifestEntry struct {
	Config   string   `json:"Config"`
	RepoTags []string `json:"RepoTags"`
	Layers   []string `json:"Layers"`
}

// imageConfig is the subset of the OCI/Docker image configuration that a FROM-scratch image needs.
type imageConfig struct {
	Architecture string          `json:"architecture"`
	OS           string          `json:"os"`
	Created      time.Time       `json:"created"`
	Config       containerConfig `json:"config"`
	RootFS       rootFS          `json:"rootfs"`
	History      []history       `json:"history"`
}

type containerConfig struct {
	User       string   `json:"User,omitempty"`
	Env        []string `json:"Env,omitempty"`
	Entrypoint []string `json:"Entrypoint"`
	Cmd        []string `json:"Cmd,omitempty"`
	WorkingDir string   `json:"WorkingDir"`
}

type rootFS struct {
	Type    string   `json:"type"`
	DiffIDs []string `json:"diff_ids"`
}

type history struct {
	Created   time.Time `json:"created"`
	CreatedBy string    `json:"created_by"`
}

// Write builds the image and writes it to w as a "docker save"-layout tarball: manifest.json,
// <config digest>.json and <layer digest>/layer.tar, all entries sorted and time-stamped epoch.
// ctr images import, docker load and podman load accept it.
func Write(w io.Writer, s *Spec) error {
	if err := s.Validate(); err != nil {
		return err
	}
	layer, err := buildLayer(s)
	if err != nil {
		return err
	}
	layerDigest := sha256.Sum256(layer)
	layerHex := hex.EncodeToString(layerDigest[:])

	env := s.Env
	if len(env) == 0 {
		env = []string{defaultEnv}
	}
	cfg := imageConfig{
		Architecture: s.Arch,
		OS:           "linux",
		Created:      epoch,
		Config: containerConfig{
			User:       s.User,
			Env:        env,
			Entrypoint: s.Entrypoint,
			Cmd:        s.Cmd,
			WorkingDir: "/",
		},
		RootFS:  rootFS{Type: "layers", DiffIDs: []string{"sha256:" + layerHex}},
		History: []history{{Created: epoch, CreatedBy: "podipc hack/image"}},
	}
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		return err
	}
	cfgDigest := sha256.Sum256(cfgJSON)
	cfgName := hex.EncodeToString(cfgDigest[:]) + ".json"
	layerName := layerHex + "/layer.tar"

	manifest, err := json.Marshal([]manifestEntry{{
		Config:   cfgName,
		RepoTags: []string{s.Tag},
		Layers:   []string{layerName},
	}})
	if err != nil {
		return err
	}

	tw := tar.NewWriter(w)
	entries := []struct {
		name string
		data []byte
	}{
		{cfgName, cfgJSON},
		{layerHex + "/", nil},
		{layerName, layer},
		{"manifest.json", manifest},
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].name < entries[j].name })
	for _, e := range entries {
		if strings.HasSuffix(e.name, "/") {
			if err := tw.WriteHeader(dirHeader(e.name, 0o755)); err != nil {
				return err
			}
			continue
		}
		if err := writeFile(tw, e.name, 0o644, e.data); err != nil {
			return err
		}
	}
	return tw.Close()
}

// buildLayer returns the single layer: every parent directory of every file, then the files,
// sorted by path, owned by root (the image's User only decides who runs the entrypoint).
func buildLayer(s *Spec) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)

	dirs := map[string]bool{}
	for _, f := range s.Files {
		for d := path.Dir(f.Path); d != "/"; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	type entry struct {
		name string
		file *File
	}
	entries := make([]entry, 0, len(dirs)+len(s.Files))
	for d := range dirs {
		entries = append(entries, entry{name: strings.TrimPrefix(d, "/") + "/"})
	}
	for i := range s.Files {
		entries = append(entries, entry{name: strings.TrimPrefix(s.Files[i].Path, "/"), file: &s.Files[i]})
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].name < entries[j].name })

	for _, e := range entries {
		if e.file == nil {
			if err := tw.WriteHeader(dirHeader(e.name, 0o755)); err != nil {
				return nil, err
			}
			continue
		}
		data, err := os.ReadFile(e.file.Source)
		if err != nil {
			return nil, err
		}
		if s.CheckELF {
			if err := checkELF(data, s.Arch); err != nil {
				return nil, fmt.Errorf("%s: %w", e.file.Source, err)
			}
		}
		mode := e.file.Mode
		if mode == 0 {
			mode = 0o755
		}
		if err := writeFile(tw, e.name, mode, data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// checkELF accepts non-ELF files and ELF files built for arch.
func checkELF(data []byte, arch string) error {
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return nil //nolint:nilerr // not an ELF binary: a data file, nothing to check
	}
	if want := archMachines[arch]; f.Machine != want {
		return fmt.Errorf("ELF machine %v, want %v for --arch %s", f.Machine, want, arch)
	}
	return nil
}

func dirHeader(name string, mode int64) *tar.Header {
	return &tar.Header{
		Typeflag: tar.TypeDir,
		Name:     name,
		Mode:     mode,
		ModTime:  epoch,
	}
}

func writeFile(tw *tar.Writer, name string, mode int64, data []byte) error {
	hdr := &tar.Header{
		Typeflag: tar.TypeReg,
		Name:     name,
		Mode:     mode,
		Size:     int64(len(data)),
		ModTime:  epoch,
	}
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	_, err := tw.Write(data)
	return err
}
