//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// sidecarMetrics reads the admin port's /metrics of pod ns/name through the API server.
func sidecarMetrics(ctx context.Context, ns, name string) (string, error) {
	b, err := clientset.CoreV1().RESTClient().Get().
		AbsPath("/api/v1/namespaces", ns, "pods", name+":7702", "proxy", "metrics").DoRaw(ctx)
	return string(b), err
}

// metricValue is the value of the one series named exactly (name{labels}) in a Prometheus
// text exposition, or 0 if it is not there (a labelled counter appears once used).
func metricValue(text, series string) float64 {
	for _, line := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil {
				return f
			}
		}
	}
	return 0
}

const refusedPlaintext = `podipc_peer_refused_total{reason="plaintext"}`

// mtls checks that the journey's peer links run mutual TLS Required, the chart's default,
// with no flag or value set for it: every talk sidecar says so, holds a workload
// certificate and admitted no plaintext link. Then two impostors replay a member's HELLO
// (docs/protocol.md) in plaintext at another member's peer port, with that member's
// namespace, name, UID and channels: an ordinary pod of the namespace, and a hostNetwork
// pod, which sends from the node — where, before mutual TLS, only the source-IP check stood
// between it and the channels. Both are refused for speaking plaintext, told why, counted
// and logged.
func (j *journey) mtls(t *testing.T) {
	for _, name := range j.talkPods {
		logs := podLogs(t.Context(), j.ns, name, "podipc-sidecar")
		if !strings.Contains(logs, "Peer links use mutual TLS with the workload certificate") || !strings.Contains(logs, `"mode":"Required"`) {
			t.Errorf("sidecar of %s does not say it runs mutual TLS Required:%s", name, j.sidecarLogs(t.Context(), name))
		}
		text, err := sidecarMetrics(t.Context(), j.ns, name)
		if err != nil {
			t.Fatal(err)
		}
		if exp := metricValue(text, "podipc_peer_certificate_expiry_timestamp_seconds"); exp < float64(time.Now().Unix()) {
			t.Errorf("sidecar of %s: certificate expiry %v: no current workload certificate", name, exp)
		}
		if n, _ := metricSum(text, "podipc_peer_plaintext_links_total"); n != 0 {
			t.Errorf("sidecar of %s admitted or dialled %v plaintext links under Required:\n%s", name, n,
				grepLines(text, "podipc_peer_plaintext_links_total"))
		}
		if up, _ := metricSum(text, "podipc_peer_link_up"); up < float64(len(j.talkPods)-1) {
			t.Errorf("sidecar of %s: %v outbound links up, want %d", name, up, len(j.talkPods)-1)
		}
	}
	target, claimed := j.pod(t, j.talkPods[0]), j.pod(t, j.talkPods[1])
	text, err := sidecarMetrics(t.Context(), j.ns, target.Name)
	if err != nil {
		t.Fatal(err)
	}
	before := metricValue(text, refusedPlaintext)
	args := []string{"hello", net.JoinHostPort(target.Status.PodIP, "7701"), claimed.Namespace, claimed.Name, string(claimed.UID), "chat,work"}
	impostors := []*corev1.Pod{testappPod("impostor", args...), testappPod("node-impostor", args...)}
	impostors[1].Spec.HostNetwork = true
	for _, p := range impostors {
		createPod(t, j.ns, p)
	}
	for _, p := range impostors {
		logs := waitLog(t, j.ns, p.Name, "\n")
		if !strings.HasPrefix(logs, "refused: this sidecar requires mutual TLS") {
			t.Errorf("%s (hostNetwork %v), replaying %s's HELLO in plaintext, was answered %q; want refused for plaintext",
				p.Name, p.Spec.HostNetwork, claimed.Name, strings.TrimSpace(logs))
		}
	}
	eventually(t, "the plaintext HELLOs never counted", func(ctx context.Context) (bool, string, error) {
		text, err := sidecarMetrics(ctx, j.ns, target.Name)
		if err != nil {
			return false, err.Error(), nil //nolint:nilerr // transient: the proxy retries
		}
		n := metricValue(text, refusedPlaintext)
		return n == before+2, fmt.Sprintf("%s %v, was %v\n%s", refusedPlaintext, n, before,
			grepLines(text, "podipc_peer_refused_total")), nil
	})
	if logs := podLogs(t.Context(), j.ns, target.Name, "podipc-sidecar"); !strings.Contains(logs, `"reason":"plaintext"`) {
		t.Errorf("sidecar of %s did not log the plaintext refusal:%s", target.Name, j.sidecarLogs(t.Context(), target.Name))
	}
	for _, p := range impostors {
		if err := clientset.CoreV1().Pods(j.ns).Delete(t.Context(), p.Name, metav1.DeleteOptions{}); err != nil {
			t.Error(err)
		}
	}
}

// pod gets pod name of the journey's namespace.
func (j *journey) pod(t *testing.T, name string) *corev1.Pod {
	t.Helper()
	p, err := clientset.CoreV1().Pods(j.ns).Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return p
}
