// Command image builds a single-layer container image FROM scratch out of static binaries and
// writes it as a "docker save"-layout tarball, so that the e2e node can import it with
// `ctr images import` without a Docker engine or a registry. The output is deterministic: the
// same inputs give the same bytes and the same image ID.
//
//	go run ./hack/image --arch amd64 --tag podipc/sidecar:dev --entrypoint /podipc-sidecar \
//	  --user 65532:65532 --out bin/images/sidecar.tar bin/linux_amd64/podipc-sidecar=/podipc-sidecar
//
// Each argument is SOURCE=/path/in/image; a bare SOURCE is placed at /<base name>.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
)

// listFlag collects a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("image", flag.ContinueOnError)
	var (
		s          Spec
		entrypoint string
		cmd        listFlag
		env        listFlag
		out        string
	)
	fs.StringVar(&s.Tag, "tag", "", "image reference repo:tag (required, not :latest)")
	fs.StringVar(&s.Arch, "arch", runtime.GOARCH, "image architecture: amd64 or arm64")
	fs.StringVar(&entrypoint, "entrypoint", "", "entrypoint, space-separated (required)")
	fs.Var(&cmd, "cmd", "an argument appended to the entrypoint (repeatable)")
	fs.StringVar(&s.User, "user", "65532:65532", "uid:gid the entrypoint runs as")
	fs.Var(&env, "env", "KEY=VALUE environment entry (repeatable; default "+defaultEnv+")")
	fs.StringVar(&out, "out", "", "output tarball path (required)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if out == "" {
		return fmt.Errorf("--out is required")
	}
	s.Entrypoint = strings.Fields(entrypoint)
	s.Cmd = cmd
	s.Env = env
	s.CheckELF = true
	for _, a := range fs.Args() {
		src, dst, ok := strings.Cut(a, "=")
		if !ok {
			dst = "/" + filepath.Base(src)
		}
		s.Files = append(s.Files, File{Source: src, Path: dst})
	}

	return writeAtomic(out, &s)
}

// writeAtomic writes the tarball to a temporary file and renames it into place, so an
// interrupted build never leaves a tarball that a later "skip if present" step would trust.
func writeAtomic(out string, s *Spec) (err error) {
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(out), ".image-*.tar")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = tmp.Close()
			_ = os.Remove(tmp.Name())
		}
	}()
	bw := bufio.NewWriter(tmp)
	if err = Write(bw, s); err != nil {
		return err
	}
	if err = bw.Flush(); err != nil {
		return err
	}
	if err = tmp.Chmod(0o644); err != nil {
		return err
	}
	if err = tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), out)
}
