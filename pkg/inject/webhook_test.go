package inject

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"gomodules.xyz/jsonpatch/v2"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"
)

var update = flag.Bool("update", false, "rewrite the golden JSON patches under testdata/")

// warnings collects the API server's Warning headers seen by one client.
type warnings struct {
	mu   sync.Mutex
	msgs []string
}

func (w *warnings) HandleWarningHeaderWithContext(_ context.Context, _ int, _ string, text string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.msgs = append(w.msgs, text)
}

func (w *warnings) take() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	m := w.msgs
	w.msgs = nil
	return m
}

// warningClient is a client whose Warning headers the test can read.
func warningClient(t *testing.T) (client.Client, *warnings) {
	t.Helper()
	w := &warnings{}
	cfg := rest.CopyConfig(env.Config)
	cfg.WarningHandlerWithContext = w
	c, err := client.New(cfg, client.Options{Scheme: env.Scheme, Mapper: env.Client.RESTMapper()})
	if err != nil {
		t.Fatal(err)
	}
	return c, w
}

// namespace creates a namespace with labels, deleted when the test ends. Pods are created in
// it at once, usually before the manager's cache has seen it: the webhook must not deny them.
func namespace(t *testing.T, labels map[string]string) string {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "inject-", Labels: labels}}
	if err := env.Client.Create(t.Context(), ns); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Client.Delete(context.Background(), ns) })
	return ns.Name
}

func eventually(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 30s")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// newPod is a minimal pod with one app container that satisfies the restricted Pod Security
// profile itself, so that any violation comes from what the webhook adds.
func newPod(ns, name string, annotations map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Annotations: annotations},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{{Name: "app", Image: "registry.example/app:1", SecurityContext: restricted()}},
		},
	}
}

func restricted() *corev1.SecurityContext {
	return &corev1.SecurityContext{
		RunAsNonRoot:             ptr.To(true),
		AllowPrivilegeEscalation: ptr.To(false),
		Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
		SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
	}
}

var optIn = map[string]string{AnnotationInject: "true", AnnotationChannels: "orders"}

// requireInjected checks the pod the API server returned carries the complete sidecar.
func requireInjected(t *testing.T, pod *corev1.Pod) {
	t.Helper()
	if pod.Labels[LabelInjected] != "true" {
		t.Fatalf("pod %s not injected: labels %v", pod.Name, pod.Labels)
	}
	if len(pod.Spec.InitContainers) == 0 || pod.Spec.InitContainers[0].Name != SidecarName {
		t.Fatalf("pod %s: first init container is not %s: %+v", pod.Name, SidecarName, pod.Spec.InitContainers)
	}
	sc := pod.Spec.InitContainers[0]
	if sc.RestartPolicy == nil || *sc.RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Errorf("sidecar is not a native sidecar: restartPolicy %v", sc.RestartPolicy)
	}
	if sc.StartupProbe == nil || sc.StartupProbe.HTTPGet.Path != "/readyz" || sc.StartupProbe.HTTPGet.Port.StrVal != AdminPortName {
		t.Errorf("sidecar startup probe: %+v", sc.StartupProbe)
	}
	// A liveness probe would cross the pod network: a partition must not get the
	// sidecar killed (docs/design.md §6.2).
	if sc.LivenessProbe != nil || sc.ReadinessProbe == nil || sc.ReadinessProbe.HTTPGet.Path != "/readyz" {
		t.Errorf("sidecar probes: liveness %+v (want none), readiness %+v", sc.LivenessProbe, sc.ReadinessProbe)
	}
	for _, c := range append(slices.Clone(pod.Spec.InitContainers), pod.Spec.Containers...) {
		if !slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool {
			return m.Name == SocketsVolume && m.MountPath == SocketDir
		}) {
			t.Errorf("container %s lacks the %s mount", c.Name, SocketsVolume)
		}
		hasToken := slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return m.Name == TokenVolume })
		if hasToken != (c.Name == SidecarName) {
			t.Errorf("container %s: podipc token mounted = %v", c.Name, hasToken)
		}
	}
}

func TestDecideTruthTable(t *testing.T) {
	tests := map[string]struct {
		nsLabel, podAnnotation string // "" means absent
		want                   Decision
		wantErr                string
	}{
		"no label, no annotation":          {want: Decision{}},
		"no label, pod true":               {podAnnotation: "true", want: Decision{Requested: true, Inject: true}},
		"no label, pod false":              {podAnnotation: "false", want: Decision{}},
		"no label, pod invalid":            {podAnnotation: "yes", wantErr: `annotation podipc.dev/inject="yes" is invalid`},
		"enabled, no annotation":           {nsLabel: "enabled", want: Decision{Requested: true, Inject: true}},
		"enabled, pod true":                {nsLabel: "enabled", podAnnotation: "true", want: Decision{Requested: true, Inject: true}},
		"enabled, pod false wins":          {nsLabel: "enabled", podAnnotation: "false", want: Decision{}},
		"enabled, pod invalid":             {nsLabel: "enabled", podAnnotation: "TRUE", wantErr: `the value must be "true" or "false"`},
		"disabled, no annotation":          {nsLabel: "disabled", want: Decision{}},
		"disabled, pod true is skipped":    {nsLabel: "disabled", podAnnotation: "true", want: Decision{Requested: true, Skip: SkipNamespaceDisabled}},
		"disabled, pod false":              {nsLabel: "disabled", podAnnotation: "false", want: Decision{}},
		"disabled, pod invalid not judged": {nsLabel: "disabled", podAnnotation: "yes", want: Decision{}},
		"invalid label, no annotation":     {nsLabel: "true", wantErr: `has label podipc.dev/inject="true": the value must be "enabled" or "disabled"`},
		"invalid label, pod true":          {nsLabel: "on", podAnnotation: "true", wantErr: `the value must be "enabled" or "disabled"`},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			pod := newPod("shop", "p", nil)
			if tt.podAnnotation != "" {
				pod.Annotations = map[string]string{AnnotationInject: tt.podAnnotation}
			}
			var labels map[string]string
			if tt.nsLabel != "" {
				labels = map[string]string{LabelNamespaceInject: tt.nsLabel}
			}
			got, err := Decide(pod, "shop", labels, "podipc-system")
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want it to contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("Decide = %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

// TestTruthTableThroughAPIServer runs the namespace-label × pod-annotation table through the
// real API server: the MutatingWebhookConfiguration's selectors and match conditions and the
// webhook together must give the same answers as Decide.
func TestTruthTableThroughAPIServer(t *testing.T) {
	nsByLabel := map[string]string{}
	for _, label := range []string{"", "enabled", "disabled"} {
		var labels map[string]string
		if label != "" {
			labels = map[string]string{LabelNamespaceInject: label}
		}
		nsByLabel[label] = namespace(t, labels)
	}
	tests := map[string]struct {
		nsLabel, podAnnotation string
		injected, rejected     bool
	}{
		"plain namespace, no annotation":     {},
		"plain namespace, pod true":          {podAnnotation: "true", injected: true},
		"plain namespace, pod false":         {podAnnotation: "false"},
		"plain namespace, pod invalid":       {podAnnotation: "enable", rejected: true},
		"enabled namespace, no annotation":   {nsLabel: "enabled", injected: true},
		"enabled namespace, pod true":        {nsLabel: "enabled", podAnnotation: "true", injected: true},
		"enabled namespace, pod false wins":  {nsLabel: "enabled", podAnnotation: "false"},
		"enabled namespace, pod invalid":     {nsLabel: "enabled", podAnnotation: "1", rejected: true},
		"disabled namespace, no annotation":  {nsLabel: "disabled"},
		"disabled namespace, pod true":       {nsLabel: "disabled", podAnnotation: "true"},
		"disabled namespace, pod false":      {nsLabel: "disabled", podAnnotation: "false"},
		"disabled namespace, pod invalid ok": {nsLabel: "disabled", podAnnotation: "maybe"},
	}
	i := 0
	for name, tt := range tests {
		i++
		t.Run(name, func(t *testing.T) {
			var ann map[string]string
			if tt.podAnnotation != "" {
				ann = map[string]string{AnnotationInject: tt.podAnnotation}
			}
			pod := newPod(nsByLabel[tt.nsLabel], fmt.Sprintf("p%d", i), ann)
			err := env.Client.Create(t.Context(), pod)
			if tt.rejected {
				if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), `the value must be "true" or "false"`) {
					t.Fatalf("want a clear rejection, got %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := pod.Labels[LabelInjected] == "true"; got != tt.injected {
				t.Fatalf("injected = %v, want %v", got, tt.injected)
			}
			if tt.injected {
				requireInjected(t, pod)
			} else if len(pod.Spec.InitContainers) != 0 || len(pod.Spec.Volumes) != 0 {
				t.Fatalf("pod changed although not injected: %+v", pod.Spec)
			}
		})
	}
}

func TestInvalidNamespaceLabelIsRejected(t *testing.T) {
	ns := namespace(t, map[string]string{LabelNamespaceInject: "true"})
	err := env.Client.Create(t.Context(), newPod(ns, "p", optIn))
	if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), `has label podipc.dev/inject="true": the value must be "enabled" or "disabled"`) {
		t.Fatalf("want a clear rejection, got %v", err)
	}
}

func TestInjectedPodThroughAPIServer(t *testing.T) {
	ns := namespace(t, nil)
	c, warns := warningClient(t)
	pod := newPod(ns, "first", map[string]string{AnnotationInject: "true", AnnotationChannels: " orders,events ,orders,"})
	if err := c.Create(t.Context(), pod); err != nil {
		t.Fatal(err)
	}
	requireInjected(t, pod)
	sc := pod.Spec.InitContainers[0]
	env := map[string]string{}
	for _, e := range sc.Env {
		switch {
		case e.ValueFrom != nil && e.ValueFrom.ResourceFieldRef != nil:
			env[e.Name] = e.ValueFrom.ResourceFieldRef.ContainerName + "/" + e.ValueFrom.ResourceFieldRef.Resource
		case e.ValueFrom != nil:
			env[e.Name] = e.ValueFrom.FieldRef.FieldPath
		default:
			env[e.Name] = e.Value
		}
	}
	want := map[string]string{
		EnvPodName: "metadata.name", EnvPodNamespace: "metadata.namespace", EnvPodUID: "metadata.uid",
		EnvPodIP: "status.podIP", EnvChannels: "events,orders", EnvMemoryLimit: SidecarName + "/limits.memory",
		EnvPeerTLS: "Disabled", EnvMaxProcs: "1",
	}
	if !mapsEqual(env, want) {
		t.Errorf("sidecar env = %v, want %v", env, want)
	}
	if sc.Image != testConfig.Image || sc.ImagePullPolicy != testConfig.PullPolicy {
		t.Errorf("image %q %q", sc.Image, sc.ImagePullPolicy)
	}
	if w := warns.take(); len(w) != 0 {
		t.Errorf("unexpected warnings on an injected pod: %q", w)
	}

	// Re-admission: a pod created from the injected pod's spec (as `kubectl get -o yaml |
	// kubectl create` does) is admitted unchanged, with a warning saying why.
	again := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{
		Namespace: ns, Name: "second", Labels: pod.Labels, Annotations: pod.Annotations,
	}, Spec: *pod.Spec.DeepCopy()}
	again.Spec.NodeName = ""
	sent := again.Spec.DeepCopy()
	if err := c.Create(t.Context(), again); err != nil {
		t.Fatal(err)
	}
	if len(again.Spec.InitContainers) != len(sent.InitContainers) || len(again.Spec.Volumes) != len(sent.Volumes) ||
		len(again.Spec.Containers[0].VolumeMounts) != len(sent.Containers[0].VolumeMounts) {
		t.Fatalf("re-admission changed the pod: %d init containers, %d volumes", len(again.Spec.InitContainers), len(again.Spec.Volumes))
	}
	if w := warns.take(); len(w) != 1 || !strings.Contains(w[0], string(SkipAlreadyInjected)) {
		t.Fatalf("warnings = %q, want one about %s", w, SkipAlreadyInjected)
	}
}

// TestSecondPassYieldsNoPatch asks the handler directly, as a reinvocation would.
func TestSecondPassYieldsNoPatch(t *testing.T) {
	ns := namespace(t, nil)
	pod := newPod(ns, "p", optIn)
	first := handle(t, pod)
	if len(first.Patches) == 0 {
		t.Fatal("first pass: no patch")
	}
	if err := testConfig.Inject(pod); err != nil {
		t.Fatal(err)
	}
	second := handle(t, pod)
	if !second.Allowed || len(second.Patches) != 0 || second.PatchType != nil {
		t.Fatalf("second pass: allowed %v, patches %v", second.Allowed, second.Patches)
	}
}

// handle runs one admission request through the webhook's handler.
func handle(t *testing.T, pod *corev1.Pod) admission.Response {
	t.Helper()
	raw, err := json.Marshal(pod)
	if err != nil {
		t.Fatal(err)
	}
	return hook.Handler(env.Scheme).Handle(t.Context(), admission.Request{AdmissionRequest: admissionv1.AdmissionRequest{
		UID: "test", Operation: admissionv1.Create, Namespace: pod.Namespace,
		Kind:     metav1.GroupVersionKind{Version: "v1", Kind: "Pod"},
		Resource: metav1.GroupVersionResource{Version: "v1", Resource: "pods"},
		Object:   runtime.RawExtension{Raw: raw},
	}})
}

func TestGoldenPatches(t *testing.T) {
	if err := env.Client.Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "golden"}}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	eventually(t, func() bool {
		m := &metav1.PartialObjectMetadata{}
		m.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("Namespace"))
		return hook.Reader.Get(t.Context(), client.ObjectKey{Name: "golden"}, m) == nil
	})
	withInit := newPod("golden", "p", optIn)
	withInit.Spec.InitContainers = []corev1.Container{{Name: "migrate", Image: "m"}, {Name: "seed", Image: "s"}}
	overrides := newPod("golden", "p", map[string]string{
		AnnotationInject: "true", AnnotationCPURequest: "10m", AnnotationCPULimit: "1", AnnotationMemoryRequest: "16Mi", AnnotationMemoryLimit: "1Gi",
		AnnotationMaxProcs: "2",
	})
	for name, pod := range map[string]*corev1.Pod{
		"minimal":            newPod("golden", "p", optIn),
		"init-containers":    withInit,
		"resource-overrides": overrides,
	} {
		t.Run(name, func(t *testing.T) {
			resp := handle(t, pod)
			if !resp.Allowed {
				t.Fatalf("denied: %v", resp.Result)
			}
			// controller-runtime computes the patch by diffing JSON, whose operation order
			// follows Go map iteration; the fixture holds the operations sorted by path.
			ops := slices.Clone(resp.Patches)
			slices.SortStableFunc(ops, func(a, b jsonpatch.JsonPatchOperation) int {
				return strings.Compare(a.Path+" "+a.Operation, b.Path+" "+b.Operation)
			})
			got, err := json.MarshalIndent(ops, "", "  ")
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, '\n')
			path := filepath.Join("testdata", name+".patch.json")
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run 'go test ./pkg/inject -run TestGoldenPatches -update')", err)
			}
			if string(got) != string(want) {
				t.Fatalf("patch differs from %s (rerun with -update and review the diff):\n%s", path, got)
			}
		})
	}
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if bv, ok := b[k]; !ok || bv != v {
			return false
		}
	}
	return true
}
