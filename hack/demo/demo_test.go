package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podipc/podipc/internal/testenv"
)

// TestDemo runs `make demo` as CI would, without a terminal: every scripted line must reach
// every other pod's app, and the demo must leave no process and no file behind.
func TestDemo(t *testing.T) {
	assets, err := testenv.AssetsDir()
	if err != nil {
		t.Fatal(err)
	}
	bin := t.TempDir()
	build := exec.CommandContext(t.Context(), "go", "build", "-o", bin+"/", "./cmd/podipc-controller", "./cmd/podipc-sidecar", "./hack/demo")
	build.Dir = testenv.RepoRoot()
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the demo: %v\n%s", err, out)
	}
	// Orphans of the demo would become children of this process, so a leftover process
	// is found whatever it is called.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir() // every temporary file of the demo and of envtest goes here

	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	demo := exec.CommandContext(ctx, filepath.Join(bin, "demo"), "--bin="+bin, "--assets="+assets)
	demo.Env = append(os.Environ(), "TMPDIR="+tmp)
	out, err := demo.CombinedOutput()
	t.Logf("demo output:\n%s", out)
	if err != nil {
		t.Fatalf("demo: %v", err)
	}
	for _, want := range []string{"pod-1 came back injected", "Every line arrived", "podipc-orders-0", "peer links over mutual TLS"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("the output does not say %q", want)
		}
	}
	for _, pod := range []string{"pod-2", "pod-3"} {
		for _, line := range script {
			if !strings.Contains(string(out), pod+" ← "+line) {
				t.Errorf("%s did not show %q arriving", pod, line)
			}
		}
	}
	if left := children(t); len(left) > 0 {
		t.Errorf("processes left behind: %v", left)
	}
	if entries, err := os.ReadDir(tmp); err != nil || len(entries) > 0 {
		t.Errorf("files left behind in TMPDIR: %v %v", entries, err)
	}
}

// children lists the command lines of this process's children.
func children(t *testing.T) []string {
	t.Helper()
	stats, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil {
		t.Fatal(err)
	}
	self := strconv.Itoa(os.Getpid())
	var out []string
	for _, path := range stats {
		b, err := os.ReadFile(path)
		if err != nil {
			continue // exited meanwhile
		}
		// The fields after the command name, which is in parentheses: state, ppid, …
		rest := string(b[strings.LastIndexByte(string(b), ')')+1:])
		if fields := strings.Fields(rest); len(fields) > 1 && fields[1] == self {
			cmdline, _ := os.ReadFile(filepath.Join(filepath.Dir(path), "cmdline"))
			out = append(out, strings.ReplaceAll(string(cmdline), "\x00", " "))
		}
	}
	return out
}
