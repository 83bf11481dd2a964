//go:build e2efaults

package faults

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
)

// exitLogTimeout bounds how long a victim's sidecar log is followed for its exit line: the
// pod's grace period (10 s) and then some.
const exitLogTimeout = time.Minute

// sidecarLog opens the log of pod's sidecar from now on, following it until the container
// ends. It is opened before the pod is deleted, so the line the sidecar logs as it exits
// cannot be missed.
func (s *suite) sidecarLog(pod string) (io.ReadCloser, error) {
	ctx, cancel := context.WithTimeout(context.Background(), exitLogTimeout)
	rc, err := clientset.CoreV1().Pods(s.ns).GetLogs(pod, &corev1.PodLogOptions{
		Container: sidecar, Follow: true, TailLines: ptr.To[int64](0),
	}).Stream(ctx)
	if err != nil {
		cancel()
		return nil, err
	}
	return &cancelOnClose{ReadCloser: rc, cancel: cancel}, nil
}

type cancelOnClose struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (c *cancelOnClose) Close() error {
	err := c.ReadCloser.Close()
	c.cancel()
	return err
}

// exitLine is the sidecar's last log line (pkg/sidecar: "Drained"), with the drop totals of
// the process.
type exitLine struct {
	Msg     string             `json:"msg"`
	Dropped map[string]float64 `json:"dropped"`
}

// readExit reads a victim's sidecar log until the exit line, and records its totals.
func (s *suite) readExit(pod string, logs io.ReadCloser) {
	defer func() { _ = logs.Close() }()
	sc := bufio.NewScanner(logs)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		s.mu.Lock()
		if s.exitLogs == nil {
			s.exitLogs = map[string][]string{}
		}
		// Kept for the verdict's evidence: a deleted pod's log is gone with it.
		if l := s.exitLogs[pod]; len(l) < 400 {
			s.exitLogs[pod] = append(l, sc.Text())
		}
		s.mu.Unlock()
		if !strings.Contains(sc.Text(), `"Drained"`) {
			continue
		}
		var l exitLine
		if json.Unmarshal(sc.Bytes(), &l) == nil && l.Msg == "Drained" {
			s.mu.Lock()
			if s.final == nil {
				s.final = map[string]map[string]float64{}
			}
			s.final[pod] = l.Dropped
			s.mu.Unlock()
			return
		}
	}
}

// addFinal takes the exit totals of the deleted victims into the tally: a drop counted after
// a sidecar's last poll is counted all the same. They are the process's totals, so the
// tally adds what they hold beyond the last poll.
func (s *suite) addFinal(tl *tally) {
	s.mu.Lock()
	final := s.final
	s.final = nil
	s.mu.Unlock()
	for name, dropped := range final {
		before := tl.latest[name]
		if before == nil {
			continue
		}
		if dropped == nil {
			dropped = map[string]float64{}
		}
		tl.add1(name, &podState{report: before.report, dropped: dropped, restarts: before.restarts})
	}
}

// leaseName is the controller's leader election Lease (cmd/podipc-controller).
const leaseName = "controller.podipc.dev"

// controllerState is what measureController found: how long after a control-plane fault the
// API server answered again through the `kubernetes` Service and the controller renewed its
// lease again, and how often its container restarted meanwhile.
type controllerState struct {
	measured bool
	routed   time.Duration
	leading  time.Duration
	restarts int32
}

// afterRoute is how long after the `kubernetes` Service routed again the controller led:
// what it controls. Before that no in-cluster client reaches the API server at all.
func (c controllerState) afterRoute() time.Duration { return max(c.leading-c.routed, 0) }

// leaseBefore reads, before a control-plane fault, the controller's restart count (nil for
// other faults: nothing is measured).
func (s *suite) leaseBefore(t *testing.T, fc faultCase) *int32 {
	if fc.kind != controlPlane {
		return nil
	}
	n, err := controllerRestarts(t.Context())
	if err != nil {
		t.Fatalf("controller restarts: %v", err)
	}
	return &n
}

// measureController reports how long after since the API server answered through the
// `kubernetes` Service and the controller's lease was renewed (so a controller leads and
// reconciles again), and how often it restarted since before.
func (s *suite) measureController(before *int32, since time.Time) <-chan controllerState {
	out := make(chan controllerState, 1)
	if before == nil {
		out <- controllerState{}
		return out
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), settleTimeout)
		defer cancel()
		st := controllerState{measured: true, routed: settleTimeout, leading: settleTimeout}
		if err := waitRouted(ctx); err == nil {
			st.routed = time.Since(since)
		}
		for ctx.Err() == nil {
			l, err := clientset.CoordinationV1().Leases(releaseNS).Get(ctx, leaseName, metav1.GetOptions{})
			if err == nil && l.Spec.RenewTime != nil && l.Spec.RenewTime.After(since) {
				st.leading = l.Spec.RenewTime.Sub(since)
				break
			}
			time.Sleep(500 * time.Millisecond)
		}
		if n, err := controllerRestarts(context.Background()); err == nil {
			st.restarts = n - *before
		}
		out <- st
	}()
	return out
}

// waitRouted returns once the API server answers /readyz through the ClusterIP of the
// `kubernetes` Service, the address the controller and the sidecars dial (in-cluster
// config). The suite itself dials the API server directly, so the two differ: a
// kube-apiserver that stops gracefully takes its address out of the Service's endpoints,
// kube-proxy then rejects connections to the ClusterIP, and it routes them again only once
// its informers have relisted after the API server's return, which their back-off (up to
// a minute after a long outage) can delay well beyond it (docs/reliability.md). The host's
// connections to a ClusterIP pass kube-proxy's rules as a pod's do.
func waitRouted(ctx context.Context) error {
	var svc *corev1.Service
	var err error
	for svc == nil {
		if svc, err = clientset.CoreV1().Services("default").Get(ctx, "kubernetes", metav1.GetOptions{}); err != nil {
			svc = nil
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(500 * time.Millisecond):
			}
		}
	}
	cfg := rest.CopyConfig(restConfig)
	cfg.Host = "https://" + net.JoinHostPort(svc.Spec.ClusterIP, "443")
	cfg.Timeout = 2 * time.Second
	viaService, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	for {
		if _, err := viaService.CoreV1().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func controllerRestarts(ctx context.Context) (int32, error) {
	pods, err := clientset.CoreV1().Pods(releaseNS).List(ctx, metav1.ListOptions{})
	if err != nil {
		return 0, err
	}
	var n int32
	for _, p := range pods.Items {
		if strings.HasPrefix(p.Name, "podipc-controller-") {
			for _, c := range p.Status.ContainerStatuses {
				n += c.RestartCount
			}
		}
	}
	return n, nil
}
