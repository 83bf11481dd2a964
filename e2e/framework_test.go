//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/utils/ptr"
)

// Generous bounds: the node has two cores and other test suites run beside it. Timings are
// never asserted, only waited for.
const (
	podTimeout = 2 * time.Minute
	poll       = 250 * time.Millisecond
)

// newNamespace creates a namespace for one test, deleted when the test ends. labels are added
// to it (e.g. Pod Security levels). Pods are created only once its default ServiceAccount exists.
func newNamespace(t *testing.T, labels map[string]string) string {
	t.Helper()
	ctx := t.Context()
	ns, err := clientset.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "e2e-", Labels: labels},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	t.Cleanup(func() {
		// t.Context is already cancelled during cleanup.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := clientset.CoreV1().Namespaces().Delete(ctx, ns.Name, metav1.DeleteOptions{}); err != nil {
			t.Errorf("delete namespace %s: %v", ns.Name, err)
		}
	})
	err = wait.PollUntilContextTimeout(ctx, poll, podTimeout, true, func(ctx context.Context) (bool, error) {
		_, err := clientset.CoreV1().ServiceAccounts(ns.Name).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, client(err)
	})
	if err != nil {
		t.Fatalf("namespace %s: default ServiceAccount never appeared: %v", ns.Name, err)
	}
	return ns.Name
}

// client turns "not found" into "not yet" for polls and keeps every other error.
func client(err error) error {
	if err == nil || apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

// restrictedSecurityContext is what Pod Security "restricted" asks of a container; the test
// pods use it everywhere, so they run in any namespace the podipc journey creates.
func restrictedSecurityContext() *corev1.SecurityContext {
	return &corev1.SecurityContext{
		AllowPrivilegeEscalation: ptr.To(false),
		RunAsNonRoot:             ptr.To(true),
		RunAsUser:                ptr.To[int64](65532),
		ReadOnlyRootFilesystem:   ptr.To(true),
		Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
		SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
	}
}

// testappPod returns a pod running the testapp image with args.
func testappPod(name string, args ...string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			TerminationGracePeriodSeconds: ptr.To[int64](2),
			Containers: []corev1.Container{{
				Name:            "app",
				Image:           testappImage,
				ImagePullPolicy: corev1.PullNever,
				Args:            args,
				SecurityContext: restrictedSecurityContext(),
			}},
		},
	}
}

func createPod(t *testing.T, ns string, pod *corev1.Pod) *corev1.Pod {
	t.Helper()
	created, err := clientset.CoreV1().Pods(ns).Create(t.Context(), pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod %s/%s: %v", ns, pod.Name, err)
	}
	return created
}

// waitPod polls pod ns/name until done says so, and fails the test with the pod's last status
// (and its events) when it does not happen in time.
func waitPod(t *testing.T, ns, name, what string, done func(*corev1.Pod) bool) *corev1.Pod {
	t.Helper()
	var last *corev1.Pod
	err := wait.PollUntilContextTimeout(t.Context(), poll, podTimeout, true, func(ctx context.Context) (bool, error) {
		p, err := clientset.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, client(err)
		}
		last = p
		return done(p), nil
	})
	if err != nil {
		t.Fatalf("pod %s/%s never became %s: %v\n%s", ns, name, what, err, describe(t, ns, last))
	}
	return last
}

// waitRunning waits for every container of the pod to be ready and returns the pod (with its IP).
func waitRunning(t *testing.T, ns, name string) *corev1.Pod {
	t.Helper()
	return waitPod(t, ns, name, "Running", func(p *corev1.Pod) bool {
		if p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" {
			return false
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady {
				return c.Status == corev1.ConditionTrue
			}
		}
		return false
	})
}

// waitLog waits until the logs of the pod's first container contain want, and returns them.
func waitLog(t *testing.T, ns, name, want string) string {
	t.Helper()
	var logs string
	err := wait.PollUntilContextTimeout(t.Context(), poll, podTimeout, true, func(ctx context.Context) (bool, error) {
		b, err := clientset.CoreV1().Pods(ns).GetLogs(name, &corev1.PodLogOptions{}).DoRaw(ctx)
		if err != nil {
			// Logs are not there until the container started; keep polling.
			return false, nil //nolint:nilerr // transient until the container runs
		}
		logs = string(b)
		return strings.Contains(logs, want), nil
	})
	if err != nil {
		t.Fatalf("logs of %s/%s never contained %q: %v\nlogs:\n%s", ns, name, want, err, logs)
	}
	return logs
}

// describe renders what a failing test needs to see: container states and the pod's events.
func describe(t *testing.T, ns string, p *corev1.Pod) string {
	t.Helper()
	if p == nil {
		return "(pod never seen)"
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "phase=%s reason=%s message=%s\n", p.Status.Phase, p.Status.Reason, p.Status.Message)
	for _, c := range p.Status.ContainerStatuses {
		fmt.Fprintf(&b, "container %s ready=%v restarts=%d state=%+v\n", c.Name, c.Ready, c.RestartCount, c.State)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	events, err := clientset.CoreV1().Events(ns).List(ctx, metav1.ListOptions{
		FieldSelector: "involvedObject.name=" + p.Name,
	})
	if err == nil {
		for _, e := range events.Items {
			fmt.Fprintf(&b, "event %s %s: %s\n", e.Type, e.Reason, e.Message)
		}
	}
	return b.String()
}
