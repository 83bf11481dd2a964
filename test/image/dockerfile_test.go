// Package image_test checks the Dockerfile statically (there is no Docker engine here):
// its final stage must agree with what the chart and the webhook run from the image.
package image_test

import (
	"bufio"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/podipc/podipc/internal/testenv"
	"github.com/podipc/podipc/pkg/inject"
)

// finalStage is what the Dockerfile's last stage says about the image.
type finalStage struct {
	from       string
	user       string
	entrypoint string
	copied     []string // destination paths of the files copied from the build stage
	built      []string // packages the build stage compiles
	cgoOff     bool
}

func parseDockerfile(t *testing.T, path string) finalStage {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	var st finalStage
	sc := bufio.NewScanner(f)
	cont := ""
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "#") || line == "" {
			continue
		}
		if l, ok := strings.CutSuffix(line, "\\"); ok {
			cont += l + " "
			continue
		}
		line, cont = cont+line, ""
		fields := strings.Fields(line)
		switch strings.ToUpper(fields[0]) {
		case "FROM":
			// A new stage: only the last one's facts describe the image.
			st = finalStage{from: fields[len(fields)-1], built: st.built, cgoOff: st.cgoOff}
			if len(fields) >= 4 && strings.EqualFold(fields[len(fields)-2], "AS") {
				st.from = fields[len(fields)-3]
			}
		case "USER":
			st.user = fields[1]
		case "ENTRYPOINT":
			st.entrypoint = strings.Trim(strings.TrimSpace(strings.TrimPrefix(line, fields[0])), `[]"`)
		case "COPY":
			args := slices.DeleteFunc(slices.Clone(fields[1:]), func(s string) bool { return strings.HasPrefix(s, "--") })
			dst := args[len(args)-1]
			for _, src := range args[:len(args)-1] {
				st.copied = append(st.copied, filepath.Join(dst, filepath.Base(src)))
			}
		case "RUN":
			if strings.Contains(line, "CGO_ENABLED=0") && strings.Contains(line, "go build") {
				st.cgoOff = true
				for _, f := range fields {
					if strings.HasPrefix(f, "./cmd/") {
						st.built = append(st.built, strings.TrimPrefix(f, "./cmd/"))
					}
				}
			}
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return st
}

func TestDockerfile(t *testing.T) {
	root := testenv.RepoRoot()
	st := parseDockerfile(t, filepath.Join(root, "Dockerfile"))

	if st.from != "scratch" && !strings.HasPrefix(st.from, "gcr.io/distroless/static") {
		t.Errorf("final stage FROM %q: want scratch or distroless static", st.from)
	}
	if st.user != "65532:65532" && st.user != "65532" {
		t.Errorf("USER %q: want the numeric non-root 65532 the chart and the webhook set", st.user)
	}
	if !st.cgoOff {
		t.Error("the binaries are not built with CGO_ENABLED=0 (the image has no libc)")
	}
	want := []string{"/podipc", "/podipc-controller", "/podipc-sidecar"}
	got := slices.Sorted(slices.Values(st.copied))
	if !slices.Equal(got, want) {
		t.Errorf("the image holds %v, want %v", got, want)
	}
	for _, bin := range want {
		name := strings.TrimPrefix(bin, "/")
		if !slices.Contains(st.built, name) {
			t.Errorf("%s is copied but the build stage does not build ./cmd/%s", bin, name)
		}
		if fi, err := os.Stat(filepath.Join(root, "cmd", name)); err != nil || !fi.IsDir() {
			t.Errorf("cmd/%s, the source of %s, does not exist", name, bin)
		}
	}
	if st.entrypoint != "/podipc-controller" {
		t.Errorf("ENTRYPOINT %q, want /podipc-controller", st.entrypoint)
	}
	// What others run from the image: the injected sidecar's command, the chart's
	// controller and test pod commands.
	if !slices.Contains(want, inject.SidecarCommand) {
		t.Errorf("the webhook injects command %q, which the image does not hold", inject.SidecarCommand)
	}
	for _, tmpl := range []string{"deployment.yaml", "tests/test-injection.yaml"} {
		raw, err := os.ReadFile(filepath.Join(root, "charts", "podipc", "templates", tmpl))
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for line := range strings.SplitSeq(string(raw), "\n") {
			if _, cmd, ok := strings.Cut(line, `command: ["`); ok {
				found = true
				bin, _, _ := strings.Cut(cmd, `"`)
				if !slices.Contains(want, bin) {
					t.Errorf("chart template %s runs %q, which the image does not hold", tmpl, bin)
				}
			}
		}
		if !found {
			t.Errorf("chart template %s has no command: the check is stale", tmpl)
		}
	}
}
