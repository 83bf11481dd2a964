//go:build e2e

package e2e

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// previousRelease is the last commit before the chart's peerTLS value: its chart has no
// such value and its sidecars, in Kubernetes mode, run plaintext peer links by default
// (they hold workload certificates but do not present them). podipc has no tagged release
// yet; this commit plays "the previous chart version" and its image.
const previousRelease = "09703a1c4445d4be7f496a23def8aef84ea7e03b"

const previousTag = podipcVersion + "-previous"

// TestUpgradeToMutualTLS walks the mixed rollout of docs/security.md ("Upgrading to mutual
// TLS") on the real node while lines flow: the previous release (plaintext peer links),
// helm upgrade to this chart with peerTLS=Permissive and new pods beside the old ones, the
// old pods replaced, helm upgrade to Required and new pods again. Every pod streams
// numbered lines on a Broadcast channel (testapp stream); between every two pods that
// are both members, every line from the moment their link is up to the end arrives, once.
// The Permissive sidecars count their plaintext links with the old pods, both ways, and
// stop counting once the old pods are gone.
func TestUpgradeToMutualTLS(t *testing.T) {
	prevChart := previousChart(t)
	kube := newCRClient(t)
	t.Cleanup(func() {
		_, _ = helm(context.Background(), "uninstall", release, "-n", releaseNS, "--wait", "--timeout", "3m")
	})
	install := append([]string{"install", release, prevChart, "-n", releaseNS, "--create-namespace", "--wait",
		"--timeout", journeyTimeout.String()}, chartValues...)
	mustHelm(t, append(install, "--set", "image.tag="+previousTag)...)
	j := &journey{kube: kube, ns: newNamespace(t, nil)}
	j.waitControllerReady(t)
	j.waitCABundle(t)
	createChannels(t, kube, j.ns)
	f := &flows{j: j, base: map[[2]string]int{}}

	// The previous release: plaintext peer links.
	f.start(t, "old-1", "old-2")
	for _, p := range []string{"old-1", "old-2"} {
		if logs := podLogs(t.Context(), j.ns, p, "podipc-sidecar"); !strings.Contains(logs, "Peer links are plaintext") {
			t.Fatalf("the previous release's sidecar of %s does not run plaintext:%s", p, j.sidecarLogs(t.Context(), p))
		}
	}

	// This chart, Permissive: new pods speak TLS to each other and plaintext to old pods.
	j.upgradeTo(t, "Permissive")
	f.start(t, "perm-1", "perm-2")
	f.advance(t)
	for _, p := range []string{"perm-1", "perm-2"} {
		text := f.metrics(t, p)
		for _, dir := range []string{"in", "out"} {
			if n := metricValue(text, `podipc_peer_plaintext_links_total{direction="`+dir+`"}`); n < 2 {
				t.Errorf("Permissive sidecar of %s counted %v plaintext links %s, want one per old pod (2):\n%s", p, n, dir,
					grepLines(text, "podipc_peer_plaintext_links_total"))
			}
		}
	}
	f.check(t)

	// The old pods restarted into Permissive (here: replaced), then Required.
	f.stop(t, "old-1", "old-2")
	plaintext := map[string]float64{}
	for _, p := range []string{"perm-1", "perm-2"} {
		plaintext[p], _ = metricSum(f.metrics(t, p), "podipc_peer_plaintext_links_total")
	}
	j.upgradeTo(t, "Required")
	f.start(t, "req-1", "req-2")
	f.advance(t)
	f.check(t)
	for _, p := range []string{"req-1", "req-2"} {
		if logs := podLogs(t.Context(), j.ns, p, "podipc-sidecar"); !strings.Contains(logs, `"mode":"Required"`) {
			t.Errorf("sidecar of %s does not run Required after the upgrade:%s", p, j.sidecarLogs(t.Context(), p))
		}
		if n, _ := metricSum(f.metrics(t, p), "podipc_peer_plaintext_links_total"); n != 0 {
			t.Errorf("Required sidecar of %s has %v plaintext links", p, n)
		}
	}
	for _, p := range []string{"perm-1", "perm-2"} {
		if n, _ := metricSum(f.metrics(t, p), "podipc_peer_plaintext_links_total"); n != plaintext[p] {
			t.Errorf("Permissive sidecar of %s counted plaintext links after the old pods left: %v, was %v", p, n, plaintext[p])
		}
	}
	t.Logf("lines checked per link (receiver <- sender: first..last): %s", f.summary)
}

// previousChart exports previousRelease into a temporary directory (never into the tree),
// builds and imports its image as previousTag, and returns its chart's directory.
func previousChart(t *testing.T) string {
	t.Helper()
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	archive := exec.CommandContext(t.Context(), "sh", "-c", `git archive "$1" | tar -x -C "$2"`, "sh", previousRelease, dir)
	archive.Dir = root
	if out, err := archive.CombinedOutput(); err != nil {
		t.Fatalf("export %s: %v\n%s", previousRelease, err, out)
	}
	if _, err := os.Stat(filepath.Join(dir, "charts/podipc/Chart.yaml")); err != nil {
		t.Fatal(err)
	}
	prev := image{Tag: podipcRepository + ":" + previousTag, Src: dir, Entrypoint: "/podipc-controller",
		Packages: []string{"./cmd/podipc-controller", "./cmd/podipc-sidecar"}}
	if err := loadImages([]image{prev}); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, "charts/podipc")
}

// upgradeTo upgrades the release to this chart and image with peerTLS=mode.
func (j *journey) upgradeTo(t *testing.T, mode string) {
	t.Helper()
	args := append([]string{"upgrade", release, "charts/podipc", "-n", releaseNS, "--wait", "--timeout", journeyTimeout.String()},
		chartValues...)
	mustHelm(t, append(args, "--set", "peerTLS="+mode)...)
	j.waitControllerReady(t)
	j.waitCABundle(t)
}

// flows follows the lines between the streaming pods. base[{to, from}] is the first line
// checked on that link: the highest line `to` had received from `from` once both were members and
// the link carried lines; from then on nothing may be missing.
type flows struct {
	j       *journey
	pods    []string
	base    map[[2]string]int
	summary []string
}

// streamReport is GET /report of testapp stream (e2e/testapp/stream.go): per channel and
// sender, the bitmap of the lines received.
type streamReport struct {
	Recv map[string]map[string]struct {
		Duplicates int    `json:"duplicates"`
		Max        int    `json:"max"`
		Seen       string `json:"seen"`
	} `json:"recv"`
}

// start creates stream pods on the Broadcast channel and waits until every link between
// the pods carries lines, where the check of each new link begins.
func (f *flows) start(t *testing.T, names ...string) {
	t.Helper()
	for _, name := range names {
		tmpl := injectedTemplate("stream", "chat", "stream", "127.0.0.1:7000", "-", "5", ":8080")
		pod := &corev1.Pod{ObjectMeta: tmpl.ObjectMeta, Spec: tmpl.Spec}
		pod.Name = name
		checkInjected(t, createPod(t, f.j.ns, pod))
	}
	for _, name := range names {
		f.j.waitPodRunning(t, f.j.ns, name)
	}
	f.pods = append(f.pods, names...)
	eventually(t, "lines never flowed between every two stream pods", func(ctx context.Context) (bool, string, error) {
		maxes, err := f.maxes(ctx)
		if err != nil {
			return false, err.Error(), nil //nolint:nilerr // a failed read is retried until the deadline, its reason shown
		}
		for _, to := range f.pods {
			for _, from := range f.pods {
				if to != from && maxes[[2]string{to, from}] == 0 {
					return false, fmt.Sprintf("%s has no line from %s yet (%v)%s", to, from, maxes, f.j.sidecarLogs(ctx, to)), nil
				}
			}
		}
		for k, n := range maxes {
			if _, ok := f.base[k]; !ok {
				f.base[k] = n
			}
		}
		return true, "", nil
	})
}

// advance waits until every link carried ten more lines.
func (f *flows) advance(t *testing.T) {
	t.Helper()
	from, err := f.maxes(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "lines stopped flowing", func(ctx context.Context) (bool, string, error) {
		now, err := f.maxes(ctx)
		if err != nil {
			return false, err.Error(), nil //nolint:nilerr // a failed read is retried until the deadline, its reason shown
		}
		for k := range f.base {
			if now[k] < from[k]+10 {
				return false, fmt.Sprintf("%s <- %s: line %d, was %d%s", k[0], k[1], now[k], from[k], f.j.sidecarLogs(ctx, k[0])), nil
			}
		}
		return true, "", nil
	})
}

// check counts the lines of every link from its base to the last received: each arrived,
// once.
func (f *flows) check(t *testing.T) {
	t.Helper()
	f.summary = nil
	for _, to := range f.pods {
		r, err := f.report(t.Context(), to)
		if err != nil {
			t.Fatal(err)
		}
		for _, from := range f.pods {
			base, ok := f.base[[2]string{to, from}]
			if !ok {
				continue
			}
			fl := r.Recv["bcast"][from]
			seen, _ := base64.StdEncoding.DecodeString(fl.Seen)
			var missing []int
			for n := base; n <= fl.Max; n++ {
				if n/8 >= len(seen) || seen[n/8]&(1<<(n%8)) == 0 {
					missing = append(missing, n)
				}
			}
			if len(missing) > 0 || fl.Duplicates > 0 {
				t.Errorf("%s <- %s: of lines %d..%d, %d missing %v, %d duplicated", to, from, base, fl.Max, len(missing), missing, fl.Duplicates)
			}
			f.summary = append(f.summary, fmt.Sprintf("%s<-%s %d..%d", to, from, base, fl.Max))
		}
	}
}

// stop deletes pods (their sidecars drain) and forgets their links.
func (f *flows) stop(t *testing.T, names ...string) {
	t.Helper()
	for _, name := range names {
		if err := clientset.CoreV1().Pods(f.j.ns).Delete(t.Context(), name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "deleted stream pods never went", func(ctx context.Context) (bool, string, error) {
		for _, name := range names {
			if _, err := clientset.CoreV1().Pods(f.j.ns).Get(ctx, name, metav1.GetOptions{}); err == nil {
				return false, name + " still there", nil
			}
		}
		return true, "", nil
	})
	f.pods = slices.DeleteFunc(f.pods, func(p string) bool { return slices.Contains(names, p) })
	for k := range f.base {
		if slices.Contains(names, k[0]) || slices.Contains(names, k[1]) {
			delete(f.base, k)
		}
	}
}

// maxes is the highest line each pod has received from each other. A pod that stopped is
// not among them: its lines stay in the reports, but no link to it is followed any more.
func (f *flows) maxes(ctx context.Context) (map[[2]string]int, error) {
	out := map[[2]string]int{}
	for _, to := range f.pods {
		r, err := f.report(ctx, to)
		if err != nil {
			return nil, err
		}
		for from, fl := range r.Recv["bcast"] {
			if slices.Contains(f.pods, from) {
				out[[2]string{to, from}] = fl.Max
			}
		}
	}
	return out, nil
}

func (f *flows) report(ctx context.Context, pod string) (*streamReport, error) {
	b, err := clientset.CoreV1().RESTClient().Get().
		AbsPath("/api/v1/namespaces", f.j.ns, "pods", pod+":8080", "proxy", "report").DoRaw(ctx)
	if err != nil {
		return nil, fmt.Errorf("report of %s: %w", pod, err)
	}
	var r streamReport
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("report of %s: %w", pod, err)
	}
	return &r, nil
}

func (f *flows) metrics(t *testing.T, pod string) string {
	t.Helper()
	text, err := sidecarMetrics(t.Context(), f.j.ns, pod)
	if err != nil {
		t.Fatal(err)
	}
	return text
}
