//go:build e2e

package e2e

import (
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
)

// nodeappImage runs e2e/nodeapp/app.cjs with node-ipc 9.2.1 on the machine's own Node.js.
const nodeappImage = "podipc-e2e/nodeapp:e2e"

// haveNodeImage says whether setup built and imported nodeappImage.
var haveNodeImage bool

// nodeImage describes an image FROM scratch holding /usr/bin/node and the shared libraries
// ldd lists for it, the node-ipc 9.2.1 package that `make test` installs into bin/npm, and
// the app. No registry and no Node base image: the same bytes the compatibility tests run.
func nodeImage() (image, error) {
	node, err := exec.LookPath("node")
	if err != nil {
		return image{}, err
	}
	if node, err = filepath.EvalSymlinks(node); err != nil {
		return image{}, err
	}
	root, err := moduleRoot()
	if err != nil {
		return image{}, err
	}
	modules := filepath.Join(root, "bin", "npm", "node-ipc-9.2.1", "node_modules")
	if _, err := os.Stat(filepath.Join(modules, "node-ipc")); err != nil {
		return image{}, fmt.Errorf("node-ipc 9.2.1 is not installed (run make test once): %w", err)
	}
	img := image{Tag: nodeappImage, Entrypoint: "/usr/bin/node", Files: []string{
		node + "=/usr/bin/node",
		filepath.Join(root, "e2e", "nodeapp", "app.cjs") + "=/app/app.cjs",
	}}
	out, err := exec.Command("ldd", node).Output()
	if err != nil {
		return image{}, fmt.Errorf("ldd %s: %w", node, err)
	}
	// "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" and "/lib64/ld-linux-x86-64.so.2 (0x…)"
	for _, m := range regexp.MustCompile(`(?m)(?:=> |^\s*)(/\S+) \(0x`).FindAllStringSubmatch(string(out), -1) {
		target, err := filepath.EvalSymlinks(m[1])
		if err != nil {
			return image{}, err
		}
		img.Files = append(img.Files, target+"="+m[1])
	}
	err = filepath.WalkDir(modules, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, err := filepath.Rel(modules, p)
		if err != nil {
			return err
		}
		img.Files = append(img.Files, p+"=/app/node_modules/"+filepath.ToSlash(rel))
		return nil
	})
	return img, err
}
