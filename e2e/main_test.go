//go:build e2e

// Package e2e runs end-to-end tests against the real single-node cluster that hack/node/up.sh
// brings up (kubelet, containerd, runc, a CNI bridge, kube-proxy). Run it with `make e2e`, which
// brings the node up, runs this suite and tears everything down again.
//
// The suite finds the cluster through the environment that up.sh writes to e2e.env:
// PODIPC_E2E_KUBECONFIG (admin kubeconfig) and PODIPC_E2E_CONTAINERD (containerd socket, used to
// import the images). Workloads only use images built here by hack/image and imported into the
// node, and every check goes through the API: pod phases, exit codes and logs, never exec.
package e2e

import (
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
	"k8s.io/client-go/tools/clientcmd"
)

// image is one image the suite needs on the node, built from Go main packages of this module.
type image struct {
	// Tag is the reference pods use; an explicit tag, never :latest (there is no registry).
	Tag string
	// Packages are the main packages, relative to the module root; each binary is placed at
	// /<last element of its package path>.
	Packages []string
	// Entrypoint is the image's entrypoint, one of the binaries.
	Entrypoint string
	// Files are more files for the image, as hack/image arguments SOURCE=/path.
	Files []string
	// Src is the module directory the packages are built in; empty means this module's
	// root (the upgrade test builds the previous release from an exported tree).
	Src string
}

// testappImage runs e2e/testapp; see its package comment for the commands.
const testappImage = "podipc-e2e/testapp:e2e"

// The podipc image, as `make image` builds it (the same binaries, user and entrypoint), with
// an explicit version tag: the chart is installed with podipcRepository:podipcVersion.
const (
	podipcRepository = "podipc-e2e/podipc"
	podipcVersion    = "v0.0.0-e2e"
	podipcImage      = podipcRepository + ":" + podipcVersion
)

var images = []image{
	{Tag: testappImage, Packages: []string{"./e2e/testapp"}, Entrypoint: "/testapp"},
	{
		Tag:        podipcImage,
		Packages:   []string{"./cmd/podipc-controller", "./cmd/podipc-sidecar", "./cmd/podipc"},
		Entrypoint: "/podipc-controller",
	},
}

// clientset talks to the cluster as cluster-admin.
var clientset kubernetes.Interface

func TestMain(m *testing.M) {
	if err := setup(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e setup:", err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

func setup() error {
	kubeconfig := os.Getenv("PODIPC_E2E_KUBECONFIG")
	if kubeconfig == "" {
		return fmt.Errorf("PODIPC_E2E_KUBECONFIG is not set: run the suite with 'make e2e' (or source e2e.env after 'make node-up')")
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	cfg.QPS, cfg.Burst = 50, 100
	if clientset, err = kubernetes.NewForConfig(cfg); err != nil {
		return err
	}
	list := images
	if img, err := nodeImage(); err != nil {
		fmt.Println("e2e: no node-ipc image, its test will skip:", err)
	} else {
		list = append(list, img)
		haveNodeImage = true
	}
	return loadImages(list)
}

// loadImages builds each image's binary (static, for the node's architecture), packs it with
// hack/image and imports it into the node's containerd.
func loadImages(list []image) error {
	sock := os.Getenv("PODIPC_E2E_CONTAINERD")
	if sock == "" {
		return fmt.Errorf("PODIPC_E2E_CONTAINERD is not set")
	}
	root, err := moduleRoot()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "podipc-e2e-images-")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(dir) }()
	for i, img := range list {
		bins := filepath.Join(dir, strconv.Itoa(i)) + "/"
		tarball := filepath.Join(dir, strings.NewReplacer("/", "_", ":", "_").Replace(img.Tag)+".tar")
		build := append([]string{"go", "build", "-trimpath", "-ldflags",
			"-s -w -X github.com/podipc/podipc/pkg/sidecar.Version=" + podipcVersion, "-o", bins}, img.Packages...)
		pack := []string{"go", "run", "./hack/image", "--arch", runtime.GOARCH, "--tag", img.Tag,
			"--entrypoint", img.Entrypoint, "--user", "65532:65532", "--out", tarball}
		for _, pkg := range img.Packages {
			pack = append(pack, bins+path.Base(pkg)+"=/"+path.Base(pkg))
		}
		pack = append(pack, img.Files...)
		steps := [][]string{
			pack,
			{"ctr", "--address", sock, "-n", "k8s.io", "images", "import", tarball},
		}
		if len(img.Packages) > 0 {
			steps = append([][]string{build}, steps...)
		}
		for i, argv := range steps {
			cmd := exec.Command(argv[0], argv[1:]...)
			cmd.Dir = root
			if i == 0 && len(img.Packages) > 0 && img.Src != "" {
				cmd.Dir = img.Src
			}
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
			if out, err := cmd.CombinedOutput(); err != nil {
				return fmt.Errorf("image %s: %s: %w\n%s", img.Tag, strings.Join(argv, " "), err, out)
			}
		}
		if fi, err := os.Stat(tarball); err == nil {
			fmt.Printf("e2e: image %s: %d bytes\n", img.Tag, fi.Size())
		}
	}
	return nil
}

func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", err
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("not inside the podipc module")
	}
	return filepath.Dir(gomod), nil
}
