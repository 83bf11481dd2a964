package inject

import (
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/pkg/identity"
	"github.com/podipc/podipc/pkg/seal"
	"github.com/podipc/podipc/pkg/sidecar"
)

// TestAccessIsEnforcedAtAdmission: a pod whose service account a Channel's spec.access does
// not list is rejected, with a message naming the account, the Channel and who may join;
// an allowed account's pod is injected, and an open Channel admits anyone.
func TestAccessIsEnforcedAtAdmission(t *testing.T) {
	ns := namespace(t, nil)
	closed := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "orders"}}
	closed.Spec.Access = &podipcv1alpha1.Access{ServiceAccounts: []string{"shop", "billing"}}
	open := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "events"}}
	open.Spec.LocalPort = 7300
	for _, ch := range []*podipcv1alpha1.Channel{closed, open} {
		if err := env.Client.Create(t.Context(), ch); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, func() bool {
		var list podipcv1alpha1.ChannelList
		return hook.Reader.List(t.Context(), &list, client.InNamespace(ns)) == nil && len(list.Items) == 2
	})
	before := testutil.ToFloat64(rejections)
	intruder := newPod(ns, "intruder", map[string]string{AnnotationInject: "true", AnnotationChannels: "events,orders"})
	err := env.Client.Create(t.Context(), intruder)
	want := `service account "default" may not join Channel "orders": its spec.access.serviceAccounts lists only "shop" and "billing"`
	if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), want) {
		t.Fatalf("want a rejection saying %q, got %v", want, err)
	}
	if got := testutil.ToFloat64(rejections); got != before+1 {
		t.Fatalf("podipc_webhook_rejections_total went from %v to %v", before, got)
	}
	for _, sa := range []string{"shop", "billing"} {
		if err := env.Client.Create(t.Context(), &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: sa}}); err != nil {
			t.Fatal(err)
		}
	}
	member := newPod(ns, "member", map[string]string{AnnotationInject: "true", AnnotationChannels: "events,orders"})
	member.Spec.ServiceAccountName = "shop"
	if err := env.Client.Create(t.Context(), member); err != nil {
		t.Fatalf("an allowed account's pod was rejected: %v", err)
	}
	requireInjected(t, member)
	anyone := newPod(ns, "anyone", map[string]string{AnnotationInject: "true", AnnotationChannels: "events"})
	if err := env.Client.Create(t.Context(), anyone); err != nil {
		t.Fatalf("an open Channel rejected a pod: %v", err)
	}
	requireInjected(t, anyone)
}

// TestSealAndIdentityInjection: with a seal key and identity configured, the webhook seals
// the pod for its namespace, account and channels, projects the identity token into the
// sidecar alone and tells the sidecar where to ask.
func TestSealAndIdentityInjection(t *testing.T) {
	key, err := seal.NewKey([]byte(strings.Repeat("k", 32)))
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig
	cfg.Seal = key
	cfg.Identity = &Identity{URL: "https://podipc-identity.podipc-system.svc:443", TrustDomain: "td", TrustBundle: "podipc-system/podipc-identity-trust"}
	w := &Webhook{Reader: hook.Reader, APIReader: hook.APIReader, Config: cfg}
	ns := namespace(t, nil)
	pod := newPod(ns, "p", map[string]string{AnnotationInject: "true", AnnotationChannels: "orders,events"})
	pod.Spec.ServiceAccountName = "app"
	if err := w.Default(t.Context(), pod); err != nil {
		t.Fatal(err)
	}
	if err := key.Check(pod, []string{"events", "orders"}); err != nil {
		t.Fatalf("the injected pod's seal does not hold: %v (annotations %v)", err, pod.Annotations)
	}
	if key.Check(pod, []string{"events", "orders", "admin"}) == nil {
		t.Fatal("the seal holds for channels the pod was not injected with")
	}
	sc := pod.Spec.InitContainers[0]
	env := map[string]string{}
	for _, e := range sc.Env {
		env[e.Name] = e.Value
	}
	if env[EnvIdentityURL] != cfg.Identity.URL || env[EnvTrustDomain] != "td" || env[EnvTrustBundle] != cfg.Identity.TrustBundle {
		t.Fatalf("sidecar env %v lacks the identity settings", env)
	}
	var token *corev1.ServiceAccountTokenProjection
	for _, v := range pod.Spec.Volumes {
		if v.Name == TokenVolume {
			for _, s := range v.Projected.Sources {
				if s.ServiceAccountToken != nil && s.ServiceAccountToken.Audience == identity.Audience {
					token = s.ServiceAccountToken
				}
			}
		}
	}
	if token == nil || token.Path != IdentityTokenPath || *token.ExpirationSeconds != 600 {
		t.Fatalf("no identity token of audience %s, path %s, 600 s in the token volume: %+v", identity.Audience, IdentityTokenPath, token)
	}
	if !slices.ContainsFunc(sc.VolumeMounts, func(m corev1.VolumeMount) bool { return m.Name == TokenVolume && m.MountPath == TokenDir }) {
		t.Fatal("the sidecar does not mount the token volume")
	}
	if want := TokenDir + "/" + IdentityTokenPath; sidecar.DefaultIdentityTokenFile != want {
		t.Fatalf("the sidecar reads its identity token from %s, the webhook projects it at %s", sidecar.DefaultIdentityTokenFile, want)
	}
}
