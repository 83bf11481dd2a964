package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/internal/pki"
	"github.com/podipc/podipc/pkg/inject"
	"github.com/podipc/podipc/pkg/peertls"
	"github.com/podipc/podipc/pkg/sidecar"
)

// nodeName is the node the demo's pods are bound to. No Node object or kubelet exists: the
// demo plays the kubelet, for the sidecar container only.
const nodeName = "podipc-demo-node"

// member is one demo pod and its sidecar process.
type member struct {
	// pod is the pod as the API server last returned it.
	pod *corev1.Pod
	// ip is the pod's IP, on the demo namespace's loopback interface (see netns.go).
	// The pods share that namespace, so each sidecar binds its ports on its pod's IP
	// rather than on every address.
	ip string
	// dir holds the pod's files: its kubeconfig (the projected token), its node-ipc
	// sockets and the sidecar's log.
	dir string
	// nodeIP is the address of the pretend node (the pod's hostIP).
	nodeIP  string
	sidecar *proc
}

// createPod creates an annotated pod through the API server, which sends it to the
// webhook, and returns the pod as admitted.
func createPod(ctx context.Context, cl client.Client, namespace, name, channel string, port int32) (*corev1.Pod, error) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: namespace, Name: name,
			Labels:      map[string]string{"app.kubernetes.io/name": "podipc-demo"},
			Annotations: map[string]string{inject.AnnotationInject: "true", inject.AnnotationChannels: channel},
		},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{
			// What the app would do in a cluster. Here the demo itself plays the app, by
			// connecting to the pod's line port.
			Name: "app", Image: "busybox:1.37",
			Command: []string{"sh", "-c", fmt.Sprintf("nc 127.0.0.1 %d", port)},
		}}},
	}
	if err := cl.Create(ctx, pod); err != nil {
		return nil, fmt.Errorf("creating pod %s: %w", name, err)
	}
	if pod.Labels[inject.LabelInjected] != "true" || sidecarOf(pod) == nil {
		return nil, fmt.Errorf("pod %s came back without the podipc sidecar: the webhook did not inject it", name)
	}
	return pod, nil
}

// sidecarOf returns the pod's injected sidecar container, or nil.
func sidecarOf(pod *corev1.Pod) *corev1.Container {
	for i := range pod.Spec.InitContainers {
		if pod.Spec.InitContainers[i].Name == podipcv1alpha1.SidecarContainerName {
			return &pod.Spec.InitContainers[i]
		}
	}
	return nil
}

// startMember plays the kubelet for the pod's sidecar: it binds the pod to the demo node,
// gives it its IP, runs the injected container as a local process and, once the sidecar's
// startup probe (/readyz) passes, reports the pod Ready, so the controller publishes it.
func startMember(ctx context.Context, c *cluster, ca *pki.CA, binDir, dir string, pod *corev1.Pod, nodeIP, ip string) (*member, error) {
	m := &member{pod: pod, ip: ip, nodeIP: nodeIP, dir: filepath.Join(dir, pod.Name)}
	if err := os.MkdirAll(filepath.Join(m.dir, "sockets"), 0o700); err != nil {
		return nil, err
	}
	cl := c.client()
	// The scheduler's part: bind the pod to a node.
	binding := &corev1.Binding{Target: corev1.ObjectReference{Kind: "Node", Name: nodeName}}
	if err := cl.SubResource("binding").Create(ctx, pod, binding); err != nil {
		return nil, fmt.Errorf("binding pod %s: %w", pod.Name, err)
	}
	if err := cl.Get(ctx, client.ObjectKeyFromObject(pod), m.pod); err != nil {
		return nil, err
	}
	// The kubelet's part: the sandbox gets its IP before any container starts, and the
	// downward API (PODIPC_POD_IP) reads it from the status.
	if err := m.setStatus(ctx, cl, false); err != nil {
		return nil, err
	}
	kubeconfig := filepath.Join(m.dir, "kubeconfig")
	if err := c.serviceAccountKubeconfig(ctx, pod.Namespace, pod.Spec.ServiceAccountName, pod, kubeconfig); err != nil {
		return nil, err
	}
	argv, env, err := m.sidecarCommand(binDir, kubeconfig)
	if err != nil {
		return nil, err
	}
	// The demo's root stands in for the controller's identity endpoint: the pod's
	// certificate names it as a peer would check it against the EndpointSlice.
	files, err := ca.WriteFiles(m.dir, peertls.Pod{TrustDomain: "cluster.local", Namespace: pod.Namespace,
		ServiceAccount: pod.Spec.ServiceAccountName, Name: pod.Name, UID: string(pod.UID)}, ca.PEM)
	if err != nil {
		return nil, err
	}
	argv = append(append(argv, "--peer-tls=Required"), files.Args()...)
	if m.sidecar, err = startProc("sidecar of "+pod.Name, filepath.Join(m.dir, "sidecar.log"), env, argv...); err != nil {
		return nil, err
	}
	hc := &http.Client{Timeout: 2 * time.Second}
	err = waitUntil(ctx, "the sidecar of "+pod.Name+" to be ready", 60*time.Second, m.sidecar, func(ctx context.Context) (bool, error) {
		_, err := httpGet(ctx, hc, m.adminURL("/readyz"))
		return err == nil, err
	})
	if err == nil {
		err = m.setStatus(ctx, cl, true)
	}
	if err != nil {
		return nil, errors.Join(err, m.sidecar.stop(10*time.Second))
	}
	return m, nil
}

// adminURL is a URL of the sidecar's admin port.
func (m *member) adminURL(path string) string {
	return "http://" + net.JoinHostPort(m.ip, strconv.Itoa(sidecar.AdminPort)) + path
}

// setStatus writes the pod status a kubelet would: the pod IP while it starts, then
// Running and Ready once the sidecar is ready. The app container is not run: the demo
// plays the app.
func (m *member) setStatus(ctx context.Context, cl client.Client, ready bool) error {
	pod := m.pod.DeepCopy()
	now := metav1.Now()
	cond := func(t corev1.PodConditionType, ok bool) corev1.PodCondition {
		s := corev1.ConditionFalse
		if ok {
			s = corev1.ConditionTrue
		}
		return corev1.PodCondition{Type: t, Status: s, LastTransitionTime: now}
	}
	pod.Status.Phase = corev1.PodPending
	if ready {
		pod.Status.Phase = corev1.PodRunning
	}
	pod.Status.HostIP, pod.Status.HostIPs = m.nodeIP, []corev1.HostIP{{IP: m.nodeIP}}
	pod.Status.PodIP, pod.Status.PodIPs = m.ip, []corev1.PodIP{{IP: m.ip}}
	pod.Status.StartTime = &now
	pod.Status.Conditions = []corev1.PodCondition{
		cond(corev1.PodScheduled, true), cond(corev1.PodReadyToStartContainers, true),
		cond(corev1.PodInitialized, ready), cond(corev1.ContainersReady, ready), cond(corev1.PodReady, ready),
	}
	pod.Status.InitContainerStatuses, pod.Status.ContainerStatuses = nil, nil
	if ready {
		// The sidecar runs; the app "runs" too, played by the demo's own connections.
		for _, c := range append([]corev1.Container{*sidecarOf(pod)}, pod.Spec.Containers...) {
			st := corev1.ContainerStatus{
				Name: c.Name, Image: c.Image, Ready: true, Started: ptr.To(true),
				State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
			}
			if c.Name == podipcv1alpha1.SidecarContainerName {
				pod.Status.InitContainerStatuses = append(pod.Status.InitContainerStatuses, st)
			} else {
				pod.Status.ContainerStatuses = append(pod.Status.ContainerStatuses, st)
			}
		}
	}
	if err := cl.Status().Update(ctx, pod); err != nil {
		return fmt.Errorf("updating the status of pod %s: %w", pod.Name, err)
	}
	m.pod = pod
	return nil
}

// sidecarCommand turns the injected container into a local command line and environment,
// as a container runtime would: the image's binary is bin/<name>, the environment is the
// container's (downward API fields resolved from the pod) and nothing else. Four flags are
// added because the pods share one network namespace and file system: the line ports on
// the pod's address (in a pod, 127.0.0.1 is the pod's own), the peer and admin ports on it
// too (the default, said explicitly), and a socket directory of the pod's own (the
// emptyDir volume). KUBECONFIG stands in for the projected service-account token.
func (m *member) sidecarCommand(binDir, kubeconfig string) (argv, env []string, err error) {
	c := sidecarOf(m.pod)
	if len(c.Command) == 0 {
		return nil, nil, fmt.Errorf("the injected %s container has no command", c.Name)
	}
	argv = append([]string{filepath.Join(binDir, filepath.Base(c.Command[0]))}, c.Command[1:]...)
	argv = append(argv, c.Args...)
	argv = append(argv,
		"--app-address="+m.ip, "--peer-address="+m.ip, "--admin-address="+m.ip,
		"--socket-dir="+filepath.Join(m.dir, "sockets"))
	for _, e := range c.Env {
		v, err := envValue(m.pod, e)
		if err != nil {
			return nil, nil, fmt.Errorf("container %s: %w", c.Name, err)
		}
		env = append(env, e.Name+"="+v)
	}
	return argv, append(env, "KUBECONFIG="+kubeconfig), nil
}

// fieldPathKey matches the downward API's metadata.labels['key'] and
// metadata.annotations['key'].
var fieldPathKey = regexp.MustCompile(`^metadata\.(labels|annotations)\['(.+)'\]$`)

// envValue resolves one container env var: a literal value or a downward API field.
func envValue(pod *corev1.Pod, e corev1.EnvVar) (string, error) {
	if e.ValueFrom == nil {
		return e.Value, nil
	}
	if r := e.ValueFrom.ResourceFieldRef; r != nil {
		return resourceValue(pod, e.Name, r)
	}
	if e.ValueFrom.FieldRef == nil {
		return "", fmt.Errorf("env %s: only values, fieldRef and resourceFieldRef are supported by the demo", e.Name)
	}
	path := e.ValueFrom.FieldRef.FieldPath
	switch path {
	case "metadata.name":
		return pod.Name, nil
	case "metadata.namespace":
		return pod.Namespace, nil
	case "metadata.uid":
		return string(pod.UID), nil
	case "spec.nodeName":
		return pod.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName, nil
	case "status.podIP":
		return pod.Status.PodIP, nil
	case "status.hostIP":
		return pod.Status.HostIP, nil
	}
	if m := fieldPathKey.FindStringSubmatch(path); m != nil {
		if m[1] == "labels" {
			return pod.Labels[m[2]], nil
		}
		return pod.Annotations[m[2]], nil
	}
	return "", fmt.Errorf("env %s: fieldRef %q is not supported by the demo", e.Name, path)
}

// resourceValue resolves a downward API resourceFieldRef to limits.memory as the kubelet
// does, in bytes (divisor 1). Without a limit the kubelet gives the node's allocatable
// memory; the demo's processes have no such bound, so it gives nothing and the sidecar
// runs without a memory budget.
func resourceValue(pod *corev1.Pod, name string, r *corev1.ResourceFieldSelector) (string, error) {
	if r.Resource != "limits.memory" || (!r.Divisor.IsZero() && r.Divisor.Value() != 1) {
		return "", fmt.Errorf("env %s: resourceFieldRef %q (divisor %s) is not supported by the demo", name, r.Resource, r.Divisor.String())
	}
	for _, c := range append(append([]corev1.Container{}, pod.Spec.InitContainers...), pod.Spec.Containers...) {
		if c.Name == r.ContainerName {
			if q, ok := c.Resources.Limits[corev1.ResourceMemory]; ok {
				return strconv.FormatInt(q.Value(), 10), nil
			}
			return "", nil
		}
	}
	return "", fmt.Errorf("env %s: resourceFieldRef names container %q, which the pod does not have", name, r.ContainerName)
}

// describeSidecar summarises the injected sidecar container of pod, in a few lines.
func describeSidecar(pod *corev1.Pod) string {
	c := sidecarOf(pod)
	var b strings.Builder
	fmt.Fprintf(&b, "initContainers[0] %s, image %s, restartPolicy %s (a native sidecar)\n",
		c.Name, c.Image, *c.RestartPolicy)
	fmt.Fprintf(&b, "  command  %s\n", strings.Join(append(append([]string{}, c.Command...), c.Args...), " "))
	var env []string
	for _, e := range c.Env {
		switch {
		case e.ValueFrom != nil && e.ValueFrom.FieldRef != nil:
			env = append(env, e.Name+"=<"+e.ValueFrom.FieldRef.FieldPath+">")
		case e.ValueFrom != nil && e.ValueFrom.ResourceFieldRef != nil:
			env = append(env, e.Name+"=<"+e.ValueFrom.ResourceFieldRef.Resource+">")
		default:
			env = append(env, e.Name+"="+e.Value)
		}
	}
	fmt.Fprintf(&b, "  env      %s\n", strings.Join(env, " "))
	ports := make([]string, 0, len(c.Ports))
	for _, p := range c.Ports {
		ports = append(ports, fmt.Sprintf("%s:%d", p.Name, p.ContainerPort))
	}
	fmt.Fprintf(&b, "  ports    %s; startupProbe GET %s\n", strings.Join(ports, " "), c.StartupProbe.HTTPGet.Path)
	mounts := make([]string, 0, len(c.VolumeMounts))
	for _, v := range c.VolumeMounts {
		mounts = append(mounts, v.Name+"→"+v.MountPath)
	}
	fmt.Fprintf(&b, "  mounts   %s (the app container mounts %s too)\n", strings.Join(mounts, " "), inject.SocketsVolume)
	fmt.Fprintf(&b, "  security runAsNonRoot, readOnlyRootFilesystem, capabilities drop ALL, seccomp %s",
		c.SecurityContext.SeccompProfile.Type)
	return b.String()
}
