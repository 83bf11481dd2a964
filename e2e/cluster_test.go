//go:build e2e

package e2e

import (
	"net"
	"strings"
	"testing"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

// TestPodRunsImportedImage checks the image path end to end: hack/image tarball, ctr import,
// containerd's CRI, runc under the restricted security context, and logs back through the kubelet.
func TestPodRunsImportedImage(t *testing.T) {
	ns := newNamespace(t, nil)
	createPod(t, ns, testappPod("hello", "print", "hello from an imported image"))
	waitRunning(t, ns, "hello")
	waitLog(t, ns, "hello", "hello from an imported image")
}

// TestPodsTalkOverPodIPs checks pod-to-pod traffic on the CNI bridge: a client pod sends a line
// to a server pod's IP and prints the answer; the server logs the client's pod IP.
func TestPodsTalkOverPodIPs(t *testing.T) {
	ns := newNamespace(t, nil)
	createPod(t, ns, testappPod("server", "serve", ":7000"))
	server := waitRunning(t, ns, "server")
	waitLog(t, ns, "server", "listening on")

	createPod(t, ns, testappPod("client", "dial", net.JoinHostPort(server.Status.PodIP, "7000"), "ping"))
	client := waitRunning(t, ns, "client")
	waitLog(t, ns, "client", `reply: echo: ping`)
	waitLog(t, ns, "server", `served "ping" from `+client.Status.PodIP+":")
	if client.Status.PodIP == server.Status.PodIP {
		t.Fatalf("client and server share pod IP %s", client.Status.PodIP)
	}
}

// TestInClusterClientReachesAPIServer checks what the podipc sidecar's in-cluster client needs:
// the kubernetes Service IP (kube-proxy, nftables mode) and a mounted service account token.
func TestInClusterClientReachesAPIServer(t *testing.T) {
	ns := newNamespace(t, nil)
	createPod(t, ns, testappPod("incluster", "apiserver"))
	waitRunning(t, ns, "incluster")
	svc, err := clientset.CoreV1().Services("default").Get(t.Context(), "kubernetes", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	waitLog(t, ns, "incluster", "via "+net.JoinHostPort(svc.Spec.ClusterIP, "443"))
}

// TestJobCompletes checks the controller manager's job controller and a container that exits 0.
func TestJobCompletes(t *testing.T) {
	ns := newNamespace(t, nil)
	tmpl := testappPod("job", "exit", "job done")
	tmpl.Spec.RestartPolicy = corev1.RestartPolicyNever
	job := &batchv1.Job{
		ObjectMeta: metav1.ObjectMeta{Name: "once"},
		Spec: batchv1.JobSpec{
			BackoffLimit: ptr.To[int32](0),
			Template:     corev1.PodTemplateSpec{ObjectMeta: tmpl.ObjectMeta, Spec: tmpl.Spec},
		},
	}
	if _, err := clientset.BatchV1().Jobs(ns).Create(t.Context(), job, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pods := waitJobPods(t, ns, "once")
	waitPod(t, ns, pods[0], "Succeeded", func(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodSucceeded })
	waitLog(t, ns, pods[0], "job done")
	waitJob(t, ns, "once", batchv1.JobComplete)
}

// TestRestrictedNamespaceRejectsNonCompliantPod checks that Pod Security admission enforces
// "restricted": a pod without the required security context is refused with the reasons, and
// the same pod with it is admitted and runs.
func TestRestrictedNamespaceRejectsNonCompliantPod(t *testing.T) {
	ns := newNamespace(t, map[string]string{"pod-security.kubernetes.io/enforce": "restricted"})

	bad := testappPod("bad", "print", "should not run")
	bad.Spec.Containers[0].SecurityContext = nil
	_, err := clientset.CoreV1().Pods(ns).Create(t.Context(), bad, metav1.CreateOptions{})
	if !apierrors.IsForbidden(err) {
		t.Fatalf("creating a non-compliant pod in a restricted namespace: err = %v, want Forbidden", err)
	}
	for _, want := range []string{`violates PodSecurity "restricted:latest"`, "allowPrivilegeEscalation", "runAsNonRoot", "seccompProfile"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("rejection %q does not mention %q", err, want)
		}
	}

	createPod(t, ns, testappPod("good", "print", "restricted and running"))
	waitRunning(t, ns, "good")
	waitLog(t, ns, "good", "restricted and running")
}
