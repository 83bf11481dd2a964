package chart_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"
)

// valueSets are the values combinations that matter; every one must lint and render.
var valueSets = map[string]map[string]string{
	"defaults":            nil,
	"cert-manager":        {"webhook.certMode": `"cert-manager"`},
	"cert-manager issuer": {"webhook.certMode": `"cert-manager"`, "webhook.certManager.issuerRef": `{"name":"corp-ca","kind":"ClusterIssuer"}`},
	"monitors":            {"metrics.serviceMonitor.enabled": "true", "metrics.podMonitor.enabled": "true", "metrics.serviceMonitor.interval": `"15s"`, "metrics.podMonitor.labels": `{"release":"prom"}`},
	"fail closed":         {"webhook.failurePolicy": `"Fail"`, "webhook.timeoutSeconds": "5", "controller.priorityClassName": `"system-cluster-critical"`},
	"custom image and resources": {
		"image":                `{"repository":"registry.example/podipc","tag":"v9.9.9","pullPolicy":"Always"}`,
		"controller.resources": `{"requests":{"cpu":"200m","memory":"128Mi"},"limits":{"memory":"1Gi"}}`,
		"sidecar.image":        `"registry.example/podipc-sidecar:v9.9.9"`,
	},
	"one replica, excluded namespaces": {"controller.replicas": "1", "webhook.excludeNamespaces": `["monitoring","kube-system"]`},
	"dashboard and alerts":             monitoringValues,
	"identity off":                     {"identity.enabled": "false", "metrics.secure": "false", "peerTLS": `"Disabled"`},
	"peer TLS permissive":              {"peerTLS": `"Permissive"`},
}

func TestLint(t *testing.T) {
	for name, values := range valueSets {
		t.Run(name, func(t *testing.T) {
			out, err := helm(t, append([]string{"lint", "--strict", chartDir, "--namespace", namespace}, setArgs(values)...)...)
			if err != nil {
				t.Fatalf("helm lint: %v\n%s", err, out)
			}
		})
	}
}

func TestRenderDefaults(t *testing.T) {
	objs := render(t, nil)

	dep := into[appsv1.Deployment](t, objs.get(t, "Deployment", "podipc-controller"))
	if dep.Namespace != namespace || *dep.Spec.Replicas != 2 {
		t.Errorf("Deployment %s/%s replicas %d, want podipc-system and 2", dep.Namespace, dep.Name, *dep.Spec.Replicas)
	}
	pod := dep.Spec.Template.Spec
	if len(pod.Containers) != 1 {
		t.Fatalf("controller pod has %d containers", len(pod.Containers))
	}
	c := pod.Containers[0]
	if c.Image != "ghcr.io/podipc/podipc:0.1.0" || !slices.Equal(c.Command, []string{"/podipc-controller"}) {
		t.Errorf("controller image %q command %q", c.Image, c.Command)
	}
	for _, arg := range []string{"--leader-elect", "--cert-mode=self", "--webhook-port=9443",
		"--webhook-config-name=podipc-injector", "--webhook-service=podipc-webhook",
		"--webhook-secret=podipc-webhook-tls", "--sidecar-image=ghcr.io/podipc/podipc:0.1.0",
		"--sidecar-cpu-request=50m", "--sidecar-cpu-limit=", "--sidecar-memory-limit=128Mi", "--sidecar-max-procs=1", "--zap-log-level=info"} {
		if !slices.Contains(c.Args, arg) {
			t.Errorf("controller args %q lack %q", c.Args, arg)
		}
	}
	if env := envVar(c.Env, "POD_NAMESPACE"); env == nil || env.ValueFrom == nil || env.ValueFrom.FieldRef.FieldPath != "metadata.namespace" {
		t.Errorf("POD_NAMESPACE is not the downward-API namespace: %+v", env)
	}
	if c.LivenessProbe == nil || c.LivenessProbe.HTTPGet.Path != "/healthz" || c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet.Path != "/readyz" {
		t.Errorf("probes: liveness %+v readiness %+v", c.LivenessProbe, c.ReadinessProbe)
	}
	assertRestricted(t, "controller", pod.SecurityContext, c.SecurityContext)
	if got := c.Resources.Requests[corev1.ResourceMemory]; got.Cmp(resource.MustParse("64Mi")) != 0 {
		t.Errorf("memory request %s", got.String())
	}
	if got := c.Resources.Limits[corev1.ResourceMemory]; got.Cmp(resource.MustParse("256Mi")) != 0 {
		t.Errorf("memory limit %s", got.String())
	}
	if pod.Affinity == nil || pod.Affinity.PodAntiAffinity == nil {
		t.Error("replicas are not spread over nodes by default")
	}
	if v := volume(pod.Volumes, "webhook-tls"); v == nil || v.Secret.SecretName != "podipc-webhook-tls" || !*v.Secret.Optional {
		t.Errorf("webhook-tls volume %+v: want the optional Secret podipc-webhook-tls in self mode", v)
	}

	pdb := into[policyv1.PodDisruptionBudget](t, objs.get(t, "PodDisruptionBudget", "podipc-controller"))
	if pdb.Spec.MaxUnavailable.IntValue() != 1 || !selects(pdb.Spec.Selector.MatchLabels, dep.Spec.Template.Labels) {
		t.Errorf("PDB %+v does not keep one of the controller pods", pdb.Spec)
	}

	svc := into[corev1.Service](t, objs.get(t, "Service", "podipc-webhook"))
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != 443 || svc.Spec.Ports[0].TargetPort != intstr.FromString("webhook") ||
		!selects(svc.Spec.Selector, dep.Spec.Template.Labels) {
		t.Errorf("webhook Service %+v does not send 443 to the controller's webhook port", svc.Spec)
	}
	if !hasPort(c.Ports, "webhook", 9443) {
		t.Errorf("controller ports %+v lack webhook 9443", c.Ports)
	}

	mwc := into[admissionregistrationv1.MutatingWebhookConfiguration](t, objs.get(t, "MutatingWebhookConfiguration", "podipc-injector"))
	if len(mwc.Webhooks) != 2 {
		t.Fatalf("webhook configuration has %d entries, want 2", len(mwc.Webhooks))
	}
	for _, w := range mwc.Webhooks {
		if len(w.ClientConfig.CABundle) != 0 {
			t.Errorf("%s renders a caBundle; helm upgrade would blank the controller's", w.Name)
		}
		if *w.FailurePolicy != admissionregistrationv1.Ignore || *w.TimeoutSeconds != 10 || *w.SideEffects != admissionregistrationv1.SideEffectClassNone {
			t.Errorf("%s: failurePolicy %s timeout %d sideEffects %s", w.Name, *w.FailurePolicy, *w.TimeoutSeconds, *w.SideEffects)
		}
		s := w.ClientConfig.Service
		if s == nil || s.Name != "podipc-webhook" || s.Namespace != namespace {
			t.Errorf("%s calls %+v", w.Name, s)
		}
		if len(w.Rules) != 1 || !slices.Equal(w.Rules[0].Operations, []admissionregistrationv1.OperationType{admissionregistrationv1.Create}) ||
			!slices.Equal(w.Rules[0].Resources, []string{"pods"}) {
			t.Errorf("%s rules %+v, want pods CREATE", w.Name, w.Rules)
		}
		excluded := notIn(w.NamespaceSelector.MatchExpressions, "kubernetes.io/metadata.name")
		if !slices.Contains(excluded, "kube-system") || !slices.Contains(excluded, namespace) {
			t.Errorf("%s does not exclude kube-system and the release namespace: %v", w.Name, excluded)
		}
	}
	if got := notIn(mwc.Webhooks[1].NamespaceSelector.MatchExpressions, "podipc.dev/inject"); !slices.Contains(got, "disabled") {
		t.Errorf("annotated-pod entry reaches podipc.dev/inject=disabled namespaces: %v", got)
	}
	if mwc.Webhooks[0].NamespaceSelector.MatchLabels["podipc.dev/inject"] != "enabled" {
		t.Errorf("enabled-namespace entry selector %+v", mwc.Webhooks[0].NamespaceSelector)
	}

	secret := into[corev1.Secret](t, objs.get(t, "Secret", "podipc-webhook-tls"))
	if len(secret.Data) != 0 || len(secret.StringData) != 0 {
		t.Error("the self-mode Secret renders data; helm upgrade would fight the controller over it")
	}
	for _, kind := range []string{"Certificate", "Issuer", "ServiceMonitor", "PodMonitor"} {
		if got := objs.kinds(kind); len(got) != 0 {
			t.Errorf("defaults render %v", got.names())
		}
	}

	testPod := into[corev1.Pod](t, objs.get(t, "Pod", "podipc-test-injection"))
	if testPod.Annotations["helm.sh/hook"] != "test" || !slices.Equal(testPod.Spec.Containers[0].Command[:2], []string{"/podipc", "check-injection"}) ||
		!slices.Contains(testPod.Spec.Containers[0].Command, "default") {
		t.Errorf("test hook pod: annotations %v command %q", testPod.Annotations, testPod.Spec.Containers[0].Command)
	}
	assertRestricted(t, "test pod", testPod.Spec.SecurityContext, testPod.Spec.Containers[0].SecurityContext)
	testRole := into[rbacv1.Role](t, objs.get(t, "Role", "podipc-test-injection"))
	if testRole.Namespace != "default" || len(testRole.Rules) != 1 || !slices.Equal(testRole.Rules[0].Verbs, []string{"create"}) ||
		!slices.Equal(testRole.Rules[0].Resources, []string{"pods"}) {
		t.Errorf("test Role %s/%s grants %+v, want only pods create in default", testRole.Namespace, testRole.Name, testRole.Rules)
	}
}

func TestRenderCertManager(t *testing.T) {
	objs := render(t, valueSets["cert-manager"])
	mwc := objs.get(t, "MutatingWebhookConfiguration", "podipc-injector")
	if got := mwc.GetAnnotations()["cert-manager.io/inject-ca-from"]; got != namespace+"/podipc-webhook" {
		t.Errorf("inject-ca-from = %q", got)
	}
	cert := objs.get(t, "Certificate", "podipc-webhook")
	if got := str(t, cert, "spec", "secretName"); got != "podipc-webhook-tls" {
		t.Errorf("Certificate secretName %q", got)
	}
	dns, _, _ := unstructured.NestedStringSlice(cert.Object, "spec", "dnsNames")
	if !slices.Contains(dns, "podipc-webhook."+namespace+".svc") {
		t.Errorf("Certificate dnsNames %v lack the Service's name", dns)
	}
	if got := str(t, cert, "spec", "issuerRef", "name"); got != "podipc-selfsigned" {
		t.Errorf("issuerRef %q", got)
	}
	objs.get(t, "Issuer", "podipc-selfsigned")
	if objs.find("Secret", "podipc-webhook-tls") != nil {
		t.Error("cert-manager mode also renders the Secret cert-manager owns")
	}
	dep := into[appsv1.Deployment](t, objs.get(t, "Deployment", "podipc-controller"))
	if !slices.Contains(dep.Spec.Template.Spec.Containers[0].Args, "--cert-mode=cert-manager") {
		t.Errorf("args %q", dep.Spec.Template.Spec.Containers[0].Args)
	}
	role := into[rbacv1.Role](t, objs.get(t, "Role", "podipc-controller"))
	for _, r := range role.Rules {
		// The identity root and the seal key are the controller's own in every mode.
		if slices.Contains(r.Resources, "secrets") && slices.Contains(r.ResourceNames, "podipc-webhook-tls") &&
			(slices.Contains(r.Verbs, "update") || slices.Contains(r.Verbs, "patch")) {
			t.Errorf("cert-manager mode lets the controller write its Secret: %+v", r)
		}
	}

	objs = render(t, valueSets["cert-manager issuer"])
	if objs.find("Issuer", "podipc-selfsigned") != nil {
		t.Error("an issuerRef still renders the self-signed Issuer")
	}
	cert = objs.get(t, "Certificate", "podipc-webhook")
	if str(t, cert, "spec", "issuerRef", "name") != "corp-ca" || str(t, cert, "spec", "issuerRef", "kind") != "ClusterIssuer" {
		t.Errorf("issuerRef %v", cert.Object["spec"].(map[string]any)["issuerRef"])
	}
}

func TestRenderMonitors(t *testing.T) {
	objs := render(t, valueSets["monitors"])
	dep := into[appsv1.Deployment](t, objs.get(t, "Deployment", "podipc-controller"))
	svc := into[corev1.Service](t, objs.get(t, "Service", "podipc-controller-metrics"))
	if !selects(svc.Spec.Selector, dep.Spec.Template.Labels) || svc.Spec.Ports[0].Name != "metrics" || svc.Spec.Ports[0].Port != 8080 {
		t.Errorf("metrics Service %+v", svc.Spec)
	}
	sm := objs.get(t, "ServiceMonitor", "podipc-controller")
	sel, _, _ := unstructured.NestedStringMap(sm.Object, "spec", "selector", "matchLabels")
	if !selects(sel, svc.Labels) {
		t.Errorf("ServiceMonitor selector %v does not select the metrics Service %v", sel, svc.Labels)
	}
	eps, _, _ := unstructured.NestedSlice(sm.Object, "spec", "endpoints")
	if len(eps) != 1 || eps[0].(map[string]any)["port"] != "metrics" || eps[0].(map[string]any)["interval"] != "15s" {
		t.Errorf("ServiceMonitor endpoints %v", eps)
	}
	pm := objs.get(t, "PodMonitor", "podipc-sidecars")
	if sel, _, _ := unstructured.NestedStringMap(pm.Object, "spec", "selector", "matchLabels"); sel["podipc.dev/injected"] != "true" {
		t.Errorf("PodMonitor selects %v, want the injected label", sel)
	}
	if anyNS, _, _ := unstructured.NestedBool(pm.Object, "spec", "namespaceSelector", "any"); !anyNS {
		t.Error("PodMonitor does not look in every namespace")
	}
	peps, _, _ := unstructured.NestedSlice(pm.Object, "spec", "podMetricsEndpoints")
	if len(peps) != 1 || peps[0].(map[string]any)["port"] != "podipc-admin" || peps[0].(map[string]any)["path"] != "/metrics" {
		t.Errorf("PodMonitor endpoints %v", peps)
	}
	if pm.GetLabels()["release"] != "prom" {
		t.Errorf("PodMonitor labels %v lack the extra label", pm.GetLabels())
	}
}

func TestRenderFailClosed(t *testing.T) {
	objs := render(t, valueSets["fail closed"])
	mwc := into[admissionregistrationv1.MutatingWebhookConfiguration](t, objs.get(t, "MutatingWebhookConfiguration", "podipc-injector"))
	for _, w := range mwc.Webhooks {
		if *w.FailurePolicy != admissionregistrationv1.Fail || *w.TimeoutSeconds != 5 {
			t.Errorf("%s failurePolicy %s timeout %d", w.Name, *w.FailurePolicy, *w.TimeoutSeconds)
		}
	}
	dep := into[appsv1.Deployment](t, objs.get(t, "Deployment", "podipc-controller"))
	if dep.Spec.Template.Spec.PriorityClassName != "system-cluster-critical" {
		t.Errorf("priorityClassName %q", dep.Spec.Template.Spec.PriorityClassName)
	}
}

func TestRenderCustomImageAndResources(t *testing.T) {
	objs := render(t, valueSets["custom image and resources"])
	dep := into[appsv1.Deployment](t, objs.get(t, "Deployment", "podipc-controller"))
	c := dep.Spec.Template.Spec.Containers[0]
	if c.Image != "registry.example/podipc:v9.9.9" || c.ImagePullPolicy != corev1.PullAlways {
		t.Errorf("image %q pull %q", c.Image, c.ImagePullPolicy)
	}
	if !slices.Contains(c.Args, "--sidecar-image=registry.example/podipc-sidecar:v9.9.9") {
		t.Errorf("args %q lack the sidecar image", c.Args)
	}
	if got := c.Resources.Limits[corev1.ResourceMemory]; got.Cmp(resource.MustParse("1Gi")) != 0 {
		t.Errorf("memory limit %s", got.String())
	}
	if got := c.Resources.Requests[corev1.ResourceCPU]; got.Cmp(resource.MustParse("200m")) != 0 {
		t.Errorf("cpu request %s", got.String())
	}
	test := into[corev1.Pod](t, objs.get(t, "Pod", "podipc-test-injection"))
	if test.Spec.Containers[0].Image != "registry.example/podipc:v9.9.9" {
		t.Errorf("test pod image %q", test.Spec.Containers[0].Image)
	}

	digest := "sha256:" + strings.Repeat("ab", 32)
	objs = render(t, map[string]string{"image.digest": `"` + digest + `"`, "image.tag": `"v1"`})
	dep = into[appsv1.Deployment](t, objs.get(t, "Deployment", "podipc-controller"))
	if got := dep.Spec.Template.Spec.Containers[0].Image; got != "ghcr.io/podipc/podipc@"+digest {
		t.Errorf("a digest does not win over the tag: %q", got)
	}
}

func TestRenderOneReplica(t *testing.T) {
	objs := render(t, valueSets["one replica, excluded namespaces"])
	if pdb := objs.find("PodDisruptionBudget", "podipc-controller"); pdb != nil {
		t.Error("one replica still gets a PDB, which would block every drain")
	}
	mwc := into[admissionregistrationv1.MutatingWebhookConfiguration](t, objs.get(t, "MutatingWebhookConfiguration", "podipc-injector"))
	got := notIn(mwc.Webhooks[1].NamespaceSelector.MatchExpressions, "kubernetes.io/metadata.name")
	if !slices.Equal(got, []string{"kube-system", namespace, "monitoring"}) {
		t.Errorf("excluded namespaces %v", got)
	}
}

// TestSchemaRejects: values.schema.json turns mistakes into install-time errors.
func TestSchemaRejects(t *testing.T) {
	tests := map[string]struct {
		values map[string]string
		want   string
	}{
		"unknown top-level key":  {map[string]string{"replicas": "3"}, "additional properties 'replicas'"},
		"unknown nested key":     {map[string]string{"webhook.failurepolicy": `"Fail"`}, "additional properties 'failurepolicy'"},
		"bad failure policy":     {map[string]string{"webhook.failurePolicy": `"Deny"`}, "failurePolicy"},
		"timeout above 30s":      {map[string]string{"webhook.timeoutSeconds": "31"}, "timeoutSeconds"},
		"bad cert mode":          {map[string]string{"webhook.certMode": `"vault"`}, "certMode"},
		"zero replicas":          {map[string]string{"controller.replicas": "0"}, "replicas"},
		"bad digest":             {map[string]string{"image.digest": `"latest"`}, "digest"},
		"bad excluded namespace": {map[string]string{"webhook.excludeNamespaces": `["Not_A_Namespace"]`}, "excludeNamespaces"},
		"bad peer TLS mode":      {map[string]string{"peerTLS": `"Strict"`}, "peerTLS"},
		"negative max procs":     {map[string]string{"sidecar.maxProcs": `-1`}, "maxProcs"},
		"peer TLS Required without identity": {
			map[string]string{"identity.enabled": "false"},
			"peerTLS=Required needs identity.enabled=true: sidecars present their workload certificates on peer links",
		},
		"peer TLS Permissive without identity": {
			map[string]string{"identity.enabled": "false", "peerTLS": `"Permissive"`}, "peerTLS=Permissive needs identity.enabled=true",
		},
		"leader election off with two replicas": {
			map[string]string{"controller.extraArgs": `["--leader-elect=false"]`}, "needs leader election",
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			_, err := helm(t, append([]string{"template", release, chartDir, "--namespace", namespace}, setArgs(tc.values)...)...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("helm template = %v; want an error mentioning %q", err, tc.want)
			}
		})
	}
}

// TestCRDsAreGenerated: charts/podipc/crds holds exactly config/crd/bases (make generate
// copies them; make verify fails on a difference, this test too).
func TestCRDsAreGenerated(t *testing.T) {
	src, _ := filepath.Glob(filepath.Join(repoRoot, "config", "crd", "bases", "*.yaml"))
	dst, _ := filepath.Glob(filepath.Join(chartDir, "crds", "*.yaml"))
	if len(src) == 0 || len(src) != len(dst) {
		t.Fatalf("config/crd/bases has %d CRDs, the chart %d", len(src), len(dst))
	}
	for _, s := range src {
		a, err := os.ReadFile(s)
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join(chartDir, "crds", filepath.Base(s)))
		if err != nil || string(a) != string(b) {
			t.Errorf("charts/podipc/crds/%s differs from config/crd/bases: run 'make generate'", filepath.Base(s))
		}
	}
}

// TestWebhookMatchesConfig: the chart's webhook entries agree with config/webhook (the
// injector's own manifest) on everything but the namespace exclusions and the values.
func TestWebhookMatchesConfig(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(repoRoot, "config", "webhook", "manifests.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var want admissionregistrationv1.MutatingWebhookConfiguration
	if err := yaml.UnmarshalStrict(raw, &want); err != nil {
		t.Fatal(err)
	}
	got := into[admissionregistrationv1.MutatingWebhookConfiguration](t, render(t, nil).get(t, "MutatingWebhookConfiguration", "podipc-injector"))
	if got.Name != want.Name || len(got.Webhooks) != len(want.Webhooks) {
		t.Fatalf("chart %s with %d entries, config/webhook %s with %d", got.Name, len(got.Webhooks), want.Name, len(want.Webhooks))
	}
	for i, w := range want.Webhooks {
		g := got.Webhooks[i]
		if g.Name != w.Name || g.ClientConfig.Service.Name != w.ClientConfig.Service.Name ||
			*g.ClientConfig.Service.Path != *w.ClientConfig.Service.Path ||
			!slices.Equal(g.AdmissionReviewVersions, w.AdmissionReviewVersions) ||
			*g.SideEffects != *w.SideEffects || *g.ReinvocationPolicy != *w.ReinvocationPolicy ||
			!slices.EqualFunc(g.MatchConditions, w.MatchConditions, func(a, b admissionregistrationv1.MatchCondition) bool { return a == b }) {
			t.Errorf("entry %d: chart %s path %s, config/webhook %s path %s (or review versions, side effects, reinvocation, match conditions differ)",
				i, g.Name, *g.ClientConfig.Service.Path, w.Name, *w.ClientConfig.Service.Path)
		}
		// Every label the injector's entry selects on, the chart's selects on too.
		for k, v := range w.NamespaceSelector.MatchLabels {
			if g.NamespaceSelector.MatchLabels[k] != v {
				t.Errorf("entry %s: the chart does not select namespaces with %s=%s", g.Name, k, v)
			}
		}
	}
}

func envVar(env []corev1.EnvVar, name string) *corev1.EnvVar {
	for i := range env {
		if env[i].Name == name {
			return &env[i]
		}
	}
	return nil
}

func volume(vs []corev1.Volume, name string) *corev1.Volume {
	for i := range vs {
		if vs[i].Name == name {
			return &vs[i]
		}
	}
	return nil
}

func hasPort(ps []corev1.ContainerPort, name string, port int32) bool {
	return slices.ContainsFunc(ps, func(p corev1.ContainerPort) bool { return p.Name == name && p.ContainerPort == port })
}

// selects reports whether every selector label is on the object.
func selects(selector, labels map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

func notIn(exprs []metav1.LabelSelectorRequirement, key string) []string {
	for _, e := range exprs {
		if e.Key == key && e.Operator == "NotIn" {
			return e.Values
		}
	}
	return nil
}

func str(t *testing.T, u *unstructured.Unstructured, fields ...string) string {
	t.Helper()
	s, _, err := unstructured.NestedString(u.Object, fields...)
	if err != nil {
		t.Fatalf("%s/%s: %v", u.GetKind(), u.GetName(), err)
	}
	return s
}

// assertRestricted checks the Pod Security Standards "restricted" profile.
func assertRestricted(t *testing.T, what string, pod *corev1.PodSecurityContext, c *corev1.SecurityContext) {
	t.Helper()
	if pod == nil || c == nil {
		t.Fatalf("%s: no securityContext", what)
	}
	ok := pod.RunAsNonRoot != nil && *pod.RunAsNonRoot &&
		c.AllowPrivilegeEscalation != nil && !*c.AllowPrivilegeEscalation &&
		c.ReadOnlyRootFilesystem != nil && *c.ReadOnlyRootFilesystem &&
		c.RunAsUser != nil && *c.RunAsUser == 65532 &&
		c.Capabilities != nil && slices.Equal(c.Capabilities.Drop, []corev1.Capability{"ALL"}) &&
		c.SeccompProfile != nil && c.SeccompProfile.Type == corev1.SeccompProfileTypeRuntimeDefault
	if !ok {
		t.Errorf("%s securityContext is not restricted: pod %+v container %+v", what, pod, c)
	}
}

// TestRenderIdentity: with identity on (the default) the chart renders the identity
// Service on the controller's identity port, passes its settings, grants every service
// account get on the trust bundle ConfigMap alone, and renders the Secrets empty; with
// identity off, none of it and --identity-bind-address=0.
func TestRenderIdentity(t *testing.T) {
	objs := render(t, nil)
	dep := into[appsv1.Deployment](t, objs.get(t, "Deployment", "podipc-controller"))
	c := dep.Spec.Template.Spec.Containers[0]
	for _, arg := range []string{"--identity-bind-address=:9444", "--trust-domain=cluster.local", "--identity-lifetime=24h",
		"--identity-propagation-delay=10m", "--identity-service=podipc-identity", "--identity-secret=podipc-identity",
		"--identity-trust-configmap=podipc-identity-trust", "--seal-secret=podipc-seal", "--metrics-secure=true"} {
		if !slices.Contains(c.Args, arg) {
			t.Errorf("controller args %q lack %q", c.Args, arg)
		}
	}
	if !hasPort(c.Ports, "identity", 9444) {
		t.Errorf("controller ports %+v lack identity 9444", c.Ports)
	}
	svc := into[corev1.Service](t, objs.get(t, "Service", "podipc-identity"))
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != 443 || svc.Spec.Ports[0].TargetPort != intstr.FromString("identity") ||
		!selects(svc.Spec.Selector, dep.Spec.Template.Labels) {
		t.Errorf("identity Service %+v does not send 443 to the controller's identity port", svc.Spec)
	}
	for _, name := range []string{"podipc-identity", "podipc-seal"} {
		if s := into[corev1.Secret](t, objs.get(t, "Secret", name)); len(s.Data) != 0 || len(s.StringData) != 0 {
			t.Errorf("Secret %s renders data; helm upgrade would replace the controller's", name)
		}
	}
	if cm := into[corev1.ConfigMap](t, objs.get(t, "ConfigMap", "podipc-identity-trust")); len(cm.Data) != 0 {
		t.Error("the trust bundle ConfigMap renders data; helm upgrade would replace the published bundle")
	}
	reader := into[rbacv1.Role](t, objs.get(t, "Role", "podipc-identity-trust-reader"))
	if len(reader.Rules) != 1 || !slices.Equal(reader.Rules[0].Verbs, []string{"get"}) || !slices.Equal(reader.Rules[0].ResourceNames, []string{"podipc-identity-trust"}) {
		t.Errorf("trust reader Role grants %+v, want get on podipc-identity-trust only", reader.Rules)
	}
	binding := into[rbacv1.RoleBinding](t, objs.get(t, "RoleBinding", "podipc-identity-trust-reader"))
	if len(binding.Subjects) != 1 || binding.Subjects[0].Kind != "Group" || binding.Subjects[0].Name != "system:serviceaccounts" {
		t.Errorf("trust reader bound to %+v", binding.Subjects)
	}

	off := render(t, valueSets["identity off"])
	for _, kind := range []struct{ kind, name string }{{"Service", "podipc-identity"}, {"Secret", "podipc-identity"}, {"Role", "podipc-identity-trust-reader"}, {"ConfigMap", "podipc-identity-trust"}} {
		if off.find(kind.kind, kind.name) != nil {
			t.Errorf("identity off still renders %s %s", kind.kind, kind.name)
		}
	}
	offArgs := into[appsv1.Deployment](t, off.get(t, "Deployment", "podipc-controller")).Spec.Template.Spec.Containers[0].Args
	if !slices.Contains(offArgs, "--identity-bind-address=0") {
		t.Errorf("identity off: args %q lack --identity-bind-address=0", offArgs)
	}
}

// TestRenderPeerTLS: mutual TLS Required is the default, the value reaches the controller,
// whose webhook passes it to every injected sidecar (pkg/inject), and plaintext renders only
// when asked for.
func TestRenderPeerTLS(t *testing.T) {
	for _, tc := range []struct {
		values map[string]string
		want   string
	}{
		{nil, "--peer-tls=Required"},
		{valueSets["peer TLS permissive"], "--peer-tls=Permissive"},
		{valueSets["identity off"], "--peer-tls=Disabled"},
	} {
		args := into[appsv1.Deployment](t, render(t, tc.values).get(t, "Deployment", "podipc-controller")).Spec.Template.Spec.Containers[0].Args
		if n := countPrefix(args, "--peer-tls="); n != 1 || !slices.Contains(args, tc.want) {
			t.Errorf("values %v: controller args %q, want %s once", tc.values, args, tc.want)
		}
	}
}

func countPrefix(args []string, prefix string) int {
	n := 0
	for _, a := range args {
		if strings.HasPrefix(a, prefix) {
			n++
		}
	}
	return n
}
