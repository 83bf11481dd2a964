// Command demo is `make demo`: podipc's whole user journey on one Linux machine, with no
// cluster, no container runtime and no root.
//
// It runs in a network namespace of its own (see netns.go for why). There it starts a
// real kube-apiserver and etcd (built from source into bin/k8s/), installs
// podipc as the Helm chart would (CRDs, RBAC, webhook configuration) and runs
// bin/podipc-controller as a process with its own service account. It applies the sample
// Channels and creates three annotated pods through the API server, which sends them to
// the controller's webhook to be injected. Then, as there is no kubelet, it plays the
// kubelet for the sidecar alone: it gives each pod an address of its own, runs the injected container's command line as a local process with the container's
// environment (downward API resolved from the pod) and a token for the pod's service
// account, and reports the pod Ready once the sidecar's startup probe passes. The
// sidecars find each other through the EndpointSlices the controller publishes: the real
// Kubernetes discovery. Last, it plays the apps: lines written into the first pod's line
// port arrive at the other pods' connections.
//
// With a terminal on stdin it then sends what the user types until Ctrl-D or Ctrl-C;
// without one it checks that every scripted line arrived, and exits 0 if so. Either way
// it stops everything it started and removes its files.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/term"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/podipc/podipc/internal/pki"
	"github.com/podipc/podipc/internal/podnet"
	"github.com/podipc/podipc/internal/testenv"
	"github.com/podipc/podipc/pkg/inject"
)

// namespace is where the demo's Channels and pods live.
const namespace = "podipc-demo"

// script is what the first pod's app says before the user takes over.
var script = []string{
	"hello from pod-1",
	"each line goes to every other connection on the channel",
	"carried by the sidecars, which found each other through EndpointSlices",
}

// options are the command-line flags.
type options struct {
	root, assets, bin string
	pods              int
	keep, interactive bool
}

func main() {
	start := time.Now()
	o := options{root: testenv.RepoRoot()}
	flag.StringVar(&o.assets, "assets", filepath.Join(o.root, "bin", "k8s", testenv.KubeVersion), "Directory of kube-apiserver, etcd and kubectl (make control-plane).")
	flag.StringVar(&o.bin, "bin", filepath.Join(o.root, "bin"), "Directory of podipc-controller and podipc-sidecar.")
	flag.IntVar(&o.pods, "pods", 3, "Number of pods (at least 2).")
	flag.BoolVar(&o.keep, "keep", false, "Keep the temporary directory (logs, kubeconfigs) after the demo.")
	flag.BoolVar(&o.interactive, "interactive", isTerminal(os.Stdin), "After the scripted lines, send the lines typed on stdin (default: if stdin is a terminal).")
	flag.Parse()
	if o.pods < 2 || o.pods > 200 {
		fmt.Fprintln(os.Stderr, "--pods must be between 2 and 200")
		os.Exit(2)
	}
	dir := os.Getenv(innerEnv)
	if dir == "" {
		os.Exit(runOutside(o))
	}

	out := &printer{w: os.Stdout, start: start}
	ctx, stop := signalContext(out)
	d := &demo{options: o, out: out, start: start, dir: dir, hostAPI: os.Getenv("PODIPC_DEMO_HOST_API")}
	err := d.run(ctx)
	if errors.Is(err, errStopped) || errors.Is(context.Cause(ctx), errStopped) {
		err = nil // the user's Ctrl-C is a normal end
	}
	if err != nil {
		out.printf("\ndemo failed: %v\n", err)
	}
	cleanupErr := d.cleanup()
	stop()
	if err != nil || cleanupErr != nil {
		os.Exit(1)
	}
}

// demo is the state of one run: everything cleanup has to stop or remove.
type demo struct {
	options
	out   *printer
	start time.Time
	// dir is the run's temporary directory (kubeconfigs, logs, sockets), which the outer
	// process created and removes.
	dir string
	// hostAPI is the outer process's address forwarding to the API server.
	hostAPI    string
	apiSocket  *forwarder
	cluster    *cluster
	controller *controller
	members    []*member
	apps       *apps
}

// run is the demo, step by step. Each step leaves what it started in d for cleanup.
func (d *demo) run(ctx context.Context) error {
	if err := podnet.Setup(); err != nil {
		return err
	}
	node, ips := podnet.NodeIP, podIPs(d.pods)
	channel, port, err := d.startPlatform(ctx, node)
	if err != nil {
		return err
	}
	pods, err := d.createPods(ctx, channel, port)
	if err != nil {
		return err
	}
	if err := d.startMembers(ctx, pods, node, ips); err != nil {
		return err
	}
	d.out.stepf("Connecting an app to each pod's line port (what `nc 127.0.0.1 %d` does in a pod)", port)
	if d.apps, err = connectApps(ctx, d.members, channel, port); err != nil {
		return err
	}
	d.out.printf("  in another terminal, this joins %s as one more app:\n    %s nc %s %d\n",
		d.members[1].pod.Name, nsenterCommand(), d.members[1].ip, port)
	if err := d.broadcast(ctx, channel); err != nil {
		return err
	}
	if err := d.showObjects(ctx); err != nil {
		return err
	}
	if !d.interactive {
		d.out.printf("\nEvery line arrived. (Run `make demo` in a terminal to type lines of your own.)\n")
		return nil
	}
	d.out.stepf("Type lines to send from %s (Ctrl-D or Ctrl-C to stop)", d.members[0].pod.Name)
	return d.apps.interact(ctx, d.out, d.members[0].pod.Name, os.Stdin)
}

// startPlatform starts the control plane and the controller, and applies the sample
// Channels. It returns the Broadcast channel's name and line port.
func (d *demo) startPlatform(ctx context.Context, node string) (string, int32, error) {
	d.out.stepf("Starting kube-apiserver and etcd from %s", d.assets)
	var err error
	if d.cluster, err = startCluster(d.assets, d.dir, node, d.hostAPI); err != nil {
		return "", 0, err
	}
	apiURL, err := url.Parse(d.cluster.env.Config.Host)
	if err != nil {
		return "", 0, err
	}
	if d.apiSocket, err = serveAPISocket(ctx, d.dir, apiURL.Host); err != nil {
		return "", 0, err
	}
	d.out.printf("  to look around while the demo runs (the API server is forwarded to %s):\n", d.hostAPI)
	d.out.printf("    export KUBECONFIG=%s\n    %s get pods,channels,endpointslices -A\n", d.cluster.userKubeconfig, d.cluster.kubectl)

	webhookPort, err := freePort("127.0.0.1")
	if err != nil {
		return "", 0, err
	}
	d.out.stepf("Installing podipc: namespace %s, config/rbac, config/webhook (called at https://127.0.0.1:%d%s)", controllerNamespace, webhookPort, inject.Path)
	if err := installController(ctx, d.cluster, d.root, webhookPort); err != nil {
		return "", 0, err
	}
	d.out.stepf("Starting bin/podipc-controller as service account %s/%s", controllerNamespace, controllerAccount)
	if d.controller, err = startController(ctx, d.cluster, d.bin, d.dir, webhookPort); err != nil {
		return "", 0, err
	}
	d.out.printf("  ready: it made its own webhook CA and serving certificate and published the CA bundle\n")
	return d.applySamples(ctx)
}

// applySamples creates the namespace, opted in to injection, and the sample Channels, and
// returns the name and line port of the Broadcast one.
func (d *demo) applySamples(ctx context.Context) (string, int32, error) {
	d.out.stepf("Creating namespace %s (label %s=enabled) and the Channels of config/samples", namespace, inject.LabelNamespaceInject)
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace, Labels: map[string]string{inject.LabelNamespaceInject: "enabled"}}}
	if err := d.cluster.client().Create(ctx, ns); err != nil {
		return "", 0, err
	}
	files, err := filepath.Glob(filepath.Join(d.root, "config", "samples", "*.yaml"))
	if err != nil {
		return "", 0, err
	}
	var channel string
	var port int64
	for _, f := range files {
		objs, err := d.cluster.applyFile(ctx, f, namespace, nil)
		if err != nil {
			return "", 0, err
		}
		for _, obj := range objs {
			delivery, _, _ := unstructured.NestedString(obj.Object, "spec", "delivery")
			localPort, _, _ := unstructured.NestedInt64(obj.Object, "spec", "localPort")
			d.out.printf("  channel %s: %s, localPort %d\n", obj.GetName(), delivery, localPort)
			if delivery == "Broadcast" && channel == "" {
				channel, port = obj.GetName(), localPort
			}
		}
	}
	if channel == "" {
		return "", 0, errors.New("config/samples has no Broadcast Channel")
	}
	return channel, int32(port), nil
}

// createPods creates the annotated pods and shows what the webhook injected.
func (d *demo) createPods(ctx context.Context, channel string, port int32) ([]*corev1.Pod, error) {
	d.out.stepf("Creating %d pods annotated %s: \"true\", %s: %q", d.pods, inject.AnnotationInject, inject.AnnotationChannels, channel)
	var pods []*corev1.Pod
	for i := 1; i <= d.pods; i++ {
		pod, err := createPod(ctx, d.cluster.client(), namespace, fmt.Sprintf("pod-%d", i), channel, port)
		if err != nil {
			return nil, err
		}
		pods = append(pods, pod)
		if i == 1 {
			d.out.printf("  %s came back injected (label %s=true):\n%s\n", pod.Name, inject.LabelInjected, indent(describeSidecar(pod), "    "))
		} else {
			d.out.printf("  %s came back injected the same way\n", pod.Name)
		}
	}
	return pods, nil
}

// startMembers plays the kubelet for each pod's sidecar.
func (d *demo) startMembers(ctx context.Context, pods []*corev1.Pod, node string, ips []string) error {
	d.out.stepf("Playing the kubelet: each pod gets an IP and runs its injected sidecar as a local process")
	ca, err := pki.NewCA("podipc demo root")
	if err != nil {
		return err
	}
	d.out.printf("  peer links: mutual TLS 1.3 required (--peer-tls=Required, the default in a cluster); each pod's certificate is issued by\n" +
		"  a throwaway root the demo made, standing in for the controller's identity endpoint\n")
	for i, pod := range pods {
		m, err := startMember(ctx, d.cluster, ca, d.bin, d.dir, pod, node, ips[i])
		if err != nil {
			return err
		}
		d.members = append(d.members, m)
		argv := m.sidecar.cmd.Args
		d.out.printf("  %s: IP %s, sidecar pid %d ready, now Running/Ready\n", pod.Name, m.ip, m.sidecar.cmd.Process.Pid)
		if i == 0 {
			d.out.printf("    $ %s %s\n    (env: the container's, downward API resolved; KUBECONFIG holds a token bound to the pod)\n",
				filepath.Base(argv[0]), strings.Join(argv[1:], " "))
		}
	}
	return nil
}

// broadcast sends the scripted lines from the first pod and waits for every other pod's
// app to read them all.
func (d *demo) broadcast(ctx context.Context, channel string) error {
	from := d.members[0].pod.Name
	d.out.stepf("Writing into %s's line port for channel %s", from, channel)
	sent := time.Now()
	for _, line := range script {
		if err := d.apps.send(ctx, d.out, from, line); err != nil {
			return err
		}
	}
	first, err := d.apps.expect(ctx, d.out, sent, script)
	if err != nil {
		return fmt.Errorf("%w\nthe sidecars' counters:\n%s", err, d.counters(ctx))
	}
	d.out.printf("  first line arrived %.1fs after the demo started\n", first.Sub(d.start).Seconds())
	return d.showTLS(ctx)
}

// showTLS says that the lines went over mutual TLS: every sidecar has a certificate in
// force and refused no peer.
func (d *demo) showTLS(ctx context.Context) error {
	hc := &http.Client{Timeout: 2 * time.Second}
	for _, m := range d.members {
		body, err := httpGet(ctx, hc, m.adminURL("/metrics"))
		if err != nil {
			return err
		}
		var expiry float64
		for line := range strings.SplitSeq(string(body), "\n") {
			if v, ok := strings.CutPrefix(line, "podipc_peer_certificate_expiry_timestamp_seconds "); ok {
				expiry, _ = strconv.ParseFloat(v, 64)
			}
		}
		if expiry == 0 {
			return fmt.Errorf("the sidecar of %s has no peer certificate in force", m.pod.Name)
		}
		d.out.printf("  %s: peer links over mutual TLS, certificate valid until %s\n", m.pod.Name,
			time.Unix(int64(expiry), 0).UTC().Format(time.RFC3339))
	}
	return nil
}

// counters returns each sidecar's line, drop and link metrics, to explain a missing line.
func (d *demo) counters(ctx context.Context) string {
	hc := &http.Client{Timeout: 2 * time.Second}
	var b strings.Builder
	for _, m := range d.members {
		body, err := httpGet(ctx, hc, m.adminURL("/metrics"))
		if err != nil {
			fmt.Fprintf(&b, "  %s: %v\n", m.pod.Name, err)
			continue
		}
		for line := range strings.SplitSeq(string(body), "\n") {
			for _, prefix := range []string{"podipc_lines_", "podipc_dropped_", "podipc_peer_", "podipc_local_"} {
				if strings.HasPrefix(line, prefix) {
					fmt.Fprintf(&b, "  %s: %s\n", m.pod.Name, line)
				}
			}
		}
	}
	return b.String()
}

// showObjects prints what the user would look at with kubectl.
func (d *demo) showObjects(ctx context.Context) error {
	d.out.stepf("kubectl get channels,endpointslices -n %s", namespace)
	text, err := d.cluster.kubectlOutput(ctx, "get", "channels,endpointslices", "-n", namespace)
	if err != nil {
		return err
	}
	d.out.printf("%s", indent(strings.TrimRight(text, "\n"), "  ")+"\n")
	return nil
}

// cleanup stops, in order, what run started: the apps, the sidecars (which drain), the
// controller, the API server and etcd; then it removes the temporary directory.
func (d *demo) cleanup() error {
	d.out.stepf("Cleaning up")
	defer func() { d.out.stepf("Clean") }()
	var errs []error
	if d.apps != nil {
		d.apps.close()
	}
	var wg sync.WaitGroup
	sidecarErrs := make([]error, len(d.members))
	for i, m := range d.members {
		wg.Go(func() { sidecarErrs[i] = m.sidecar.stop(15 * time.Second) })
	}
	wg.Wait()
	errs = append(errs, sidecarErrs...)
	if len(d.members) > 0 {
		d.out.printf("  sidecars stopped (SIGTERM: they drained and said goodbye to their peers)\n")
	}
	if d.controller != nil {
		errs = append(errs, d.controller.stop(15*time.Second))
		d.out.printf("  controller stopped\n")
	}
	if d.apiSocket != nil {
		d.apiSocket.close()
	}
	if d.cluster != nil {
		errs = append(errs, d.cluster.stop())
		d.out.printf("  kube-apiserver and etcd stopped\n")
	}
	err := errors.Join(errs...)
	if err != nil {
		d.out.printf("  cleanup: %v\n", err)
	}
	return err
}

// signalContext is cancelled, with cause errStopped, by the first SIGINT or SIGTERM. Later
// signals only say that cleanup is under way: exiting then would leave kube-apiserver and
// etcd running, which only envtest can stop, and every step of cleanup is bounded.
func signalContext(out *printer) (context.Context, func()) {
	ctx, cancel := context.WithCancelCause(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	done := make(chan struct{})
	go func() {
		first := true
		for {
			select {
			case <-sigs:
				if first {
					cancel(errStopped)
					first = false
					continue
				}
				out.printf("  still cleaning up (each step has a time limit); please wait\n")
			case <-done:
				return
			}
		}
	}()
	return ctx, func() {
		signal.Stop(sigs)
		close(done)
		cancel(nil)
	}
}

// printer serialises the demo's output and stamps each step with the time since start.
type printer struct {
	mu    sync.Mutex
	w     io.Writer
	start time.Time
}

// stepf prints the heading of a step.
func (p *printer) stepf(format string, args ...any) {
	p.printf("\n[%5.1fs] %s\n", time.Since(p.start).Seconds(), fmt.Sprintf(format, args...))
}

// printf prints a line or more of a step.
func (p *printer) printf(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, _ = fmt.Fprintf(p.w, format, args...)
}

// nsenterCommand is the command prefix that runs a command in the demo's namespaces.
func nsenterCommand() string {
	if !podnet.UserNamespace() {
		return fmt.Sprintf("nsenter --net --target %d", os.Getpid())
	}
	return fmt.Sprintf("nsenter --preserve-credentials --user --net --target %d", os.Getpid())
}

// indent prefixes every non-empty line of s.
func indent(s, prefix string) string {
	lines := strings.Split(s, "\n")
	for i, l := range lines {
		if l != "" {
			lines[i] = prefix + l
		}
	}
	return strings.Join(lines, "\n")
}

// isTerminal reports whether f is a terminal (not merely a character device: /dev/null
// is one too, and CI gives it as stdin).
func isTerminal(f *os.File) bool { return term.IsTerminal(int(f.Fd())) }
