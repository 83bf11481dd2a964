package inject

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
)

func TestSkipReasons(t *testing.T) {
	plain := namespace(t, nil)
	disabled := namespace(t, map[string]string{LabelNamespaceInject: "disabled"})
	hostNet := newPod(plain, "host", optIn)
	hostNet.Spec.HostNetwork = true
	injectedSpec := newPod(plain, "copy", optIn)
	if err := testConfig.Inject(injectedSpec); err != nil {
		t.Fatal(err)
	}
	tests := map[SkipReason]*corev1.Pod{
		SkipKubeSystem:          newPod(metav1.NamespaceSystem, "podipc-skip-test", optIn),
		SkipControllerNamespace: newPod(testConfig.ControllerNamespace, "skip-test", optIn),
		SkipNamespaceDisabled:   newPod(disabled, "skip-test", optIn),
		SkipHostNetwork:         hostNet,
		SkipAlreadyInjected:     injectedSpec,
	}
	if len(tests) != len(SkipReasons) {
		t.Fatalf("%d cases for %d skip reasons", len(tests), len(SkipReasons))
	}
	for reason, pod := range tests {
		t.Run(string(reason), func(t *testing.T) {
			c, warns := warningClient(t)
			before := testutil.ToFloat64(skips.WithLabelValues(string(reason)))
			sent := pod.Spec.DeepCopy()
			if err := c.Create(t.Context(), pod); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = env.Client.Delete(context.Background(), pod) })
			w := warns.take()
			if len(w) != 1 || !strings.Contains(w[0], "sidecar not injected ("+string(reason)+")") {
				t.Fatalf("warnings = %q, want one naming %s", w, reason)
			}
			if len(pod.Spec.InitContainers) != len(sent.InitContainers) || len(pod.Spec.Volumes) != len(sent.Volumes) {
				t.Fatal("a skipped pod was changed")
			}
			if got := testutil.ToFloat64(skips.WithLabelValues(string(reason))) - before; got != 1 {
				t.Fatalf("podipc_webhook_skips_total{reason=%q} grew by %v, want 1", reason, got)
			}
		})
	}
}

// TestRestrictedPodSecurity shows the injected pod passes the API server's enforcement of
// the restricted Pod Security profile, and that the enforcement is really on.
func TestRestrictedPodSecurity(t *testing.T) {
	ns := namespace(t, map[string]string{"pod-security.kubernetes.io/enforce": "restricted"})
	plain := newPod(ns, "plain", nil)
	plain.Spec.Containers[0].SecurityContext = nil
	if err := env.Client.Create(t.Context(), plain); !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "violates PodSecurity") {
		t.Fatalf("a non-compliant pod must be rejected by Pod Security admission, got %v", err)
	}
	pod := newPod(ns, "injected", optIn)
	if err := env.Client.Create(t.Context(), pod); err != nil {
		t.Fatalf("injected pod rejected under the restricted profile: %v", err)
	}
	requireInjected(t, pod)
}

func TestInitContainersKeepTheirOrder(t *testing.T) {
	ns := namespace(t, nil)
	pod := newPod(ns, "p", optIn)
	for _, name := range []string{"migrate", "seed", "warm"} {
		pod.Spec.InitContainers = append(pod.Spec.InitContainers, corev1.Container{Name: name, Image: "x", SecurityContext: restricted()})
	}
	if err := env.Client.Create(t.Context(), pod); err != nil {
		t.Fatal(err)
	}
	requireInjected(t, pod)
	var names []string
	for _, c := range pod.Spec.InitContainers {
		names = append(names, c.Name)
	}
	if want := []string{SidecarName, "migrate", "seed", "warm"}; !slices.Equal(names, want) {
		t.Fatalf("init containers %v, want %v", names, want)
	}
}

// TestJobPodTemplate creates a pod from a Job's template as the Job controller would (none
// runs here): it gets the native sidecar, so the Job can complete when its app exits.
func TestJobPodTemplate(t *testing.T) {
	ns := namespace(t, nil)
	job := &batchv1.Job{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "report"},
		Spec: batchv1.JobSpec{Template: corev1.PodTemplateSpec{
			ObjectMeta: metav1.ObjectMeta{Annotations: optIn},
			Spec: corev1.PodSpec{
				RestartPolicy: corev1.RestartPolicyNever,
				Containers:    []corev1.Container{{Name: "report", Image: "registry.example/report:1"}},
			},
		}},
	}
	if err := env.Client.Create(t.Context(), job); err != nil {
		t.Fatal(err)
	}
	if len(job.Spec.Template.Spec.InitContainers) != 0 {
		t.Fatal("the Job's template itself must not be injected")
	}
	pod := &corev1.Pod{
		ObjectMeta: *job.Spec.Template.ObjectMeta.DeepCopy(),
		Spec:       *job.Spec.Template.Spec.DeepCopy(),
	}
	pod.Namespace, pod.GenerateName = ns, "report-"
	pod.OwnerReferences = []metav1.OwnerReference{{
		APIVersion: "batch/v1", Kind: "Job", Name: job.Name, UID: job.UID, Controller: ptr.To(true),
	}}
	if err := env.Client.Create(t.Context(), pod); err != nil {
		t.Fatal(err)
	}
	requireInjected(t, pod)
	if pod.Spec.RestartPolicy != corev1.RestartPolicyNever {
		t.Fatalf("restartPolicy = %s", pod.Spec.RestartPolicy)
	}
}

func TestLocalPortClashIsRejected(t *testing.T) {
	ns := namespace(t, nil)
	for name, port := range map[string]int32{"orders": 7100, "events": 7100, "audit": 7200} {
		ch := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
		ch.Spec.LocalPort = port
		if err := env.Client.Create(t.Context(), ch); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, func() bool {
		var list podipcv1alpha1.ChannelList
		return hook.Reader.List(t.Context(), &list, client.InNamespace(ns)) == nil && len(list.Items) == 3
	})
	clash := newPod(ns, "clash", map[string]string{AnnotationInject: "true", AnnotationChannels: "orders,audit,events"})
	err := env.Client.Create(t.Context(), clash)
	if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), `channels "events" and "orders" share localPort 7100`) {
		t.Fatalf("want a rejection naming both channels and the port, got %v", err)
	}
	fine := newPod(ns, "fine", map[string]string{AnnotationInject: "true", AnnotationChannels: "orders,audit,missing"})
	if err := env.Client.Create(t.Context(), fine); err != nil {
		t.Fatal(err)
	}
	requireInjected(t, fine)
}

func TestInvalidAnnotationsAreRejected(t *testing.T) {
	ns := namespace(t, nil)
	tests := map[string]struct {
		annotations map[string]string
		want        string
	}{
		"cpu request":    {map[string]string{AnnotationCPURequest: "lots"}, `annotation podipc.dev/sidecar-cpu-request="lots" is not a valid non-negative quantity`},
		"memory limit":   {map[string]string{AnnotationMemoryLimit: "-1Gi"}, `annotation podipc.dev/sidecar-memory-limit="-1Gi" is not a valid`},
		"channel name":   {map[string]string{AnnotationChannels: "orders,Bad_Name"}, `names channel "Bad_Name", which is not a valid Channel name`},
		"max procs":      {map[string]string{AnnotationMaxProcs: "-2"}, `annotation podipc.dev/sidecar-max-procs="-2" is not a whole number of 0 or more`},
		"max procs word": {map[string]string{AnnotationMaxProcs: "all"}, `annotation podipc.dev/sidecar-max-procs="all" is not a whole number`},
		"resources kept": {map[string]string{AnnotationCPURequest: "25m", AnnotationMemoryLimit: "256Mi", AnnotationMaxProcs: "0"}, ""},
	}
	i := 0
	for name, tt := range tests {
		i++
		t.Run(name, func(t *testing.T) {
			ann := map[string]string{AnnotationInject: "true"}
			for k, v := range tt.annotations {
				ann[k] = v
			}
			pod := newPod(ns, fmt.Sprintf("p%d", i), ann)
			err := env.Client.Create(t.Context(), pod)
			if tt.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				r := pod.Spec.InitContainers[0].Resources
				if r.Requests.Cpu().String() != "25m" || r.Limits.Memory().String() != "256Mi" || r.Requests.Memory().String() != "32Mi" {
					t.Fatalf("resources %v", r)
				}
				procs := []string{}
				for _, e := range pod.Spec.InitContainers[0].Env {
					if e.Name == EnvMaxProcs {
						procs = append(procs, e.Value)
					}
				}
				if len(procs) != 1 || procs[0] != "0" {
					t.Fatalf("sidecar %s = %q, want the annotation's \"0\" once", EnvMaxProcs, procs)
				}
				return
			}
			if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want a rejection containing %q", err, tt.want)
			}
		})
	}
}

// TestWebhookDownIsFlagged points the webhook configuration at a closed port: with the
// default failurePolicy Ignore the pod is admitted without the sidecar, and Monitor
// records an InjectionMissing Event on it and InjectionHealthy=False on its Channel, which
// returns to True when the pod goes.
func TestWebhookDownIsFlagged(t *testing.T) {
	ns := namespace(t, nil)
	ch := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "orders"}}
	if err := env.Client.Create(t.Context(), ch); err != nil {
		t.Fatal(err)
	}
	breakWebhook(t, ns)

	var pod *corev1.Pod
	for i := 0; ; i++ { // the API server picks up the configuration change asynchronously
		pod = newPod(ns, fmt.Sprintf("p%d", i), optIn)
		if err := env.Client.Create(t.Context(), pod); err != nil {
			t.Fatal(err)
		}
		if pod.Labels[LabelInjected] != "true" {
			break
		}
		if i > 200 {
			t.Fatal("the webhook configuration change never took effect")
		}
	}
	eventually(t, func() bool {
		var events eventsv1.EventList
		if err := env.Client.List(t.Context(), &events, client.InNamespace(ns)); err != nil {
			return false
		}
		return slices.ContainsFunc(events.Items, func(e eventsv1.Event) bool {
			return e.Regarding.Name == pod.Name && e.Reason == ReasonInjectionMissing && e.Type == corev1.EventTypeWarning
		})
	})
	condition := func() *metav1.Condition {
		var got podipcv1alpha1.Channel
		if err := env.Client.Get(t.Context(), client.ObjectKeyFromObject(ch), &got); err != nil {
			t.Fatal(err)
		}
		return meta.FindStatusCondition(got.Status.Conditions, ConditionInjectionHealthy)
	}
	eventually(t, func() bool {
		c := condition()
		return c != nil && c.Status == metav1.ConditionFalse && c.Reason == ReasonPodsNotInjected && strings.Contains(c.Message, pod.Name)
	})
	if err := env.Client.Delete(t.Context(), pod, client.GracePeriodSeconds(0)); err != nil {
		t.Fatal(err)
	}
	eventually(t, func() bool {
		c := condition()
		return c != nil && c.Status == metav1.ConditionTrue && c.Reason == ReasonPodsInjected
	})
}

// breakWebhook points every entry of podipc-injector at a closed port until the test ends,
// then restores it and waits until pods in ns are injected again.
func breakWebhook(t *testing.T, ns string) {
	t.Helper()
	var cfg admissionregistrationv1.MutatingWebhookConfiguration
	if err := env.Client.Get(t.Context(), client.ObjectKey{Name: "podipc-injector"}, &cfg); err != nil {
		t.Fatal(err)
	}
	orig := cfg.DeepCopy()
	for i := range cfg.Webhooks {
		if p := cfg.Webhooks[i].FailurePolicy; p == nil || *p != admissionregistrationv1.Ignore {
			t.Fatalf("webhook %s: failurePolicy %v, want the default Ignore", cfg.Webhooks[i].Name, p)
		}
		cfg.Webhooks[i].ClientConfig.URL = ptr.To("https://127.0.0.1:1" + Path)
	}
	if err := env.Client.Update(t.Context(), &cfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		var cur admissionregistrationv1.MutatingWebhookConfiguration
		if err := env.Client.Get(context.Background(), client.ObjectKey{Name: "podipc-injector"}, &cur); err != nil {
			t.Error(err)
			return
		}
		cur.Webhooks = orig.Webhooks
		if err := env.Client.Update(context.Background(), &cur); err != nil {
			t.Error(err)
		}
		for i := 0; ; i++ { // the tests that follow need the webhook back
			probe := newPod(ns, fmt.Sprintf("probe%d", i), optIn)
			if err := env.Client.Create(context.Background(), probe); err != nil {
				t.Error(err)
				return
			}
			if probe.Labels[LabelInjected] == "true" {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
}
