package testenv

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestAssetsDirMissingBinaries: without binaries the tests must fail with a message that
// says how to get them, never skip silently.
func TestAssetsDirMissingBinaries(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("KUBEBUILDER_ASSETS", dir)
	_, err := AssetsDir()
	if err == nil || !strings.Contains(err.Error(), "make control-plane") || !strings.Contains(err.Error(), "kube-apiserver") {
		t.Fatalf("AssetsDir() error = %v, want one naming kube-apiserver and 'make control-plane'", err)
	}

	for _, name := range []string{"kube-apiserver", "etcd"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("#!/bin/true\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	got, err := AssetsDir()
	if err != nil || got != dir {
		t.Errorf("AssetsDir() = %q, %v; want %q", got, err, dir)
	}
}
