//go:build e2efaults

// Package faults is the fault-injection suite of the real node (hack/node): podipc member pods
// send numbered lines at a fixed rate while the suite breaks the pod network, kills sidecars,
// deletes pods and stops the control plane, then counts every line — sent, delivered, lost,
// counted as dropped, duplicated, reordered — against docs/guarantees.md, and writes the
// figures to docs/reliability.md. Run it with `make e2e-faults` (root), which brings the node up,
// runs this suite and tears everything down; faults are made by hack/node/fault.sh and undone
// after each one, whatever happens.
package faults

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	ctrlclient "sigs.k8s.io/controller-runtime/pkg/client"

	k8sruntime "k8s.io/apimachinery/pkg/runtime"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
)

// The images, as e2e/main_test.go builds them for the journey (the same tags: one node holds
// both suites' images).
const (
	testappImage     = "podipc-e2e/testapp:e2e"
	podipcRepository = "podipc-e2e/podipc"
	podipcVersion    = "v0.0.0-e2e"
	podipcImage      = podipcRepository + ":" + podipcVersion
)

var (
	clientset kubernetes.Interface
	// restConfig reaches the API server directly, at the node's address.
	restConfig *rest.Config
	kube       ctrlclient.Client
	root       string
)

func TestMain(m *testing.M) {
	if err := setup(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e/faults setup:", err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

func setup() error {
	kubeconfig := os.Getenv("PODIPC_E2E_KUBECONFIG")
	if kubeconfig == "" {
		return fmt.Errorf("PODIPC_E2E_KUBECONFIG is not set: run the suite with 'make e2e-faults'")
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	cfg.QPS, cfg.Burst = 50, 100
	restConfig = cfg
	if clientset, err = kubernetes.NewForConfig(cfg); err != nil {
		return err
	}
	scheme := k8sruntime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return err
	}
	if err := podipcv1alpha1.AddToScheme(scheme); err != nil {
		return err
	}
	if kube, err = ctrlclient.New(cfg, ctrlclient.Options{Scheme: scheme}); err != nil {
		return err
	}
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return err
	}
	root = filepath.Dir(strings.TrimSpace(string(out)))
	if err := loadImage(testappImage, "/testapp", "./e2e/testapp"); err != nil {
		return err
	}
	return loadImage(podipcImage, "/podipc-controller", "./cmd/podipc-controller", "./cmd/podipc-sidecar", "./cmd/podipc")
}

// loadImage builds static binaries of pkgs, packs them with hack/image and imports the image
// into the node's containerd.
func loadImage(tag, entrypoint string, pkgs ...string) error {
	sock := os.Getenv("PODIPC_E2E_CONTAINERD")
	if sock == "" {
		return fmt.Errorf("PODIPC_E2E_CONTAINERD is not set")
	}
	dir, err := os.MkdirTemp("", "podipc-e2e-faults-")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(dir) }()
	bins, tarball := dir+"/bin/", dir+"/image.tar"
	build := append([]string{"go", "build", "-trimpath", "-ldflags",
		"-s -w -X github.com/podipc/podipc/pkg/sidecar.Version=" + podipcVersion, "-o", bins}, pkgs...)
	pack := []string{"go", "run", "./hack/image", "--arch", runtime.GOARCH, "--tag", tag,
		"--entrypoint", entrypoint, "--user", "65532:65532", "--out", tarball}
	for _, p := range pkgs {
		pack = append(pack, bins+path.Base(p)+"=/"+path.Base(p))
	}
	for _, argv := range [][]string{build, pack, {"ctr", "--address", sock, "-n", "k8s.io", "images", "import", tarball}} {
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("image %s: %s: %w\n%s", tag, strings.Join(argv, " "), err, out)
		}
	}
	return nil
}

// helm runs the pinned bin/helm against the node.
func helm(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(root, "bin", "helm"), args...)
	cmd.Dir = root
	tmp := filepath.Join(os.TempDir(), "podipc-e2e-helm")
	cmd.Env = append(os.Environ(), "KUBECONFIG="+os.Getenv("PODIPC_E2E_KUBECONFIG"),
		"HELM_CACHE_HOME="+tmp+"/cache", "HELM_CONFIG_HOME="+tmp+"/config", "HELM_DATA_HOME="+tmp+"/data")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("helm %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// fault runs hack/node/fault.sh; see that script for the faults it makes and undoes.
func fault(args ...string) error {
	cmd := exec.Command(filepath.Join(root, "hack", "node", "fault.sh"), args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("fault.sh %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

func mustFault(t *testing.T, args ...string) {
	t.Helper()
	if err := fault(args...); err != nil {
		t.Fatal(err)
	}
}

// itoa keeps call sites short.
func itoa(n int) string { return strconv.Itoa(n) }
