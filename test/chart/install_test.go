package chart_test

import (
	"bytes"
	"fmt"
	"testing"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/internal/testenv"
)

var (
	env        *testenv.Env
	kubeconfig string
)

// TestMain starts the real API server WITHOUT the CRD: installing it is the chart's job.
func TestMain(m *testing.M) {
	testenv.MainWith(m, &env, []testenv.Option{testenv.WithoutCRDs()}, setup)
}

// setup teaches the client the CRD kind, to check it is established and kept, and writes
// the kubeconfig helm uses.
func setup(e *testenv.Env) (func(), error) {
	if err := apiextensionsv1.AddToScheme(e.Scheme); err != nil {
		return nil, err
	}
	var err error
	kubeconfig, err = e.WriteKubeconfig(e.Dir, "chart-test-admin")
	return nil, err
}

func helmKube(t *testing.T, args ...string) string {
	t.Helper()
	out, err := helm(t, append(args, "--kubeconfig", kubeconfig)...)
	if err != nil {
		t.Fatalf("helm %v: %v", args, err)
	}
	return out
}

// TestInstallUpgradeUninstall walks the chart's life against the real API server: the
// controller pods never run (there is no kubelet), so this checks what the API server
// accepts and what Helm does to objects someone else has written to.
func TestInstallUpgradeUninstall(t *testing.T) {
	ctx := t.Context()
	c := env.Client

	helmKube(t, "install", release, chartDir, "--namespace", namespace, "--create-namespace")
	manifest := parseObjects(t, helmKube(t, "get", "manifest", release, "--namespace", namespace))
	if len(manifest) < 10 {
		t.Fatalf("the release holds only %v", manifest.names())
	}
	for _, u := range manifest {
		if err := c.Get(ctx, key(u), emptyLike(u)); err != nil {
			t.Errorf("%s/%s was not created: %v", u.GetKind(), u.GetName(), err)
		}
	}
	crd := &apiextensionsv1.CustomResourceDefinition{}
	testenv.Eventually(t, "the Channel CRD to be established", func() error {
		if err := c.Get(ctx, client.ObjectKey{Name: "channels.podipc.dev"}, crd); err != nil {
			return err
		}
		for _, cond := range crd.Status.Conditions {
			if cond.Type == apiextensionsv1.Established && cond.Status == apiextensionsv1.ConditionTrue {
				return nil
			}
		}
		return fmt.Errorf("conditions %v", crd.Status.Conditions)
	})

	// What the leading controller does in self mode: fill the Secret, write caBundle.
	caBundle := []byte("-----BEGIN CERTIFICATE-----\nZmFrZSBDQSBmb3IgdGhlIGNoYXJ0IHRlc3Q=\n-----END CERTIFICATE-----\n")
	mwc := &admissionregistrationv1.MutatingWebhookConfiguration{}
	if err := c.Get(ctx, client.ObjectKey{Name: "podipc-injector"}, mwc); err != nil {
		t.Fatal(err)
	}
	before := mwc.DeepCopy()
	for i := range mwc.Webhooks {
		mwc.Webhooks[i].ClientConfig.CABundle = caBundle
	}
	if err := c.Patch(ctx, mwc, client.MergeFrom(before), client.FieldOwner("podipc-controller")); err != nil {
		t.Fatal(err)
	}
	secret := &corev1.Secret{}
	if err := c.Get(ctx, client.ObjectKey{Namespace: namespace, Name: "podipc-webhook-tls"}, secret); err != nil {
		t.Fatal(err)
	}
	secretBefore := secret.DeepCopy()
	secret.Data = map[string][]byte{"tls.crt": []byte("cert"), "tls.key": []byte("key"), "ca.crt": caBundle}
	if err := c.Patch(ctx, secret, client.MergeFrom(secretBefore), client.FieldOwner("podipc-controller")); err != nil {
		t.Fatal(err)
	}

	// A user's Channel, which must outlive the release.
	userNS := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}
	if err := c.Create(ctx, userNS); err != nil {
		t.Fatal(err)
	}
	ch := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "orders"}}
	if err := c.Create(ctx, ch); err != nil {
		t.Fatal(err)
	}

	// Upgrades, server-side (Helm 4's default) and client-side (three-way merge), each
	// changing the webhook's values: caBundle and the certificate must survive both.
	for i, upgrade := range []struct {
		policy  admissionregistrationv1.FailurePolicyType
		timeout int32
		flags   []string
	}{
		{admissionregistrationv1.Fail, 7, nil},
		{admissionregistrationv1.Ignore, 12, []string{"--server-side=false"}},
	} {
		args := append([]string{"upgrade", release, chartDir, "--namespace", namespace,
			"--set", "webhook.failurePolicy=" + string(upgrade.policy), "--set", fmt.Sprintf("webhook.timeoutSeconds=%d", upgrade.timeout)}, upgrade.flags...)
		helmKube(t, args...)
		got := &admissionregistrationv1.MutatingWebhookConfiguration{}
		if err := c.Get(ctx, client.ObjectKey{Name: "podipc-injector"}, got); err != nil {
			t.Fatal(err)
		}
		for _, w := range got.Webhooks {
			if !bytes.Equal(w.ClientConfig.CABundle, caBundle) {
				t.Errorf("upgrade %d %v: %s lost the controller's caBundle (now %q)", i+1, upgrade.flags, w.Name, w.ClientConfig.CABundle)
			}
			if *w.FailurePolicy != upgrade.policy || *w.TimeoutSeconds != upgrade.timeout {
				t.Errorf("upgrade %d %v: %s failurePolicy %s timeout %d, want %s %d", i+1, upgrade.flags, w.Name, *w.FailurePolicy, *w.TimeoutSeconds, upgrade.policy, upgrade.timeout)
			}
		}
		s := &corev1.Secret{}
		if err := c.Get(ctx, client.ObjectKey{Namespace: namespace, Name: "podipc-webhook-tls"}, s); err != nil {
			t.Fatal(err)
		}
		if string(s.Data["tls.crt"]) != "cert" || string(s.Data["tls.key"]) != "key" {
			t.Errorf("upgrade %d %v: the controller's certificate was wiped from the Secret: %v", i+1, upgrade.flags, s.Data)
		}
	}

	manifest = parseObjects(t, helmKube(t, "get", "manifest", release, "--namespace", namespace))
	helmKube(t, "uninstall", release, "--namespace", namespace, "--wait")
	for _, u := range manifest {
		testenv.Eventually(t, u.GetKind()+"/"+u.GetName()+" to be deleted", func() error {
			err := c.Get(ctx, key(u), emptyLike(u))
			if apierrors.IsNotFound(err) {
				return nil
			}
			return fmt.Errorf("still there (%w)", err)
		})
	}
	releases := &corev1.SecretList{}
	if err := c.List(ctx, releases, client.InNamespace(namespace), client.MatchingLabels{"owner": "helm", "name": release}); err != nil {
		t.Fatal(err)
	}
	if len(releases.Items) != 0 {
		t.Errorf("helm left %d release records", len(releases.Items))
	}
	if err := c.Get(ctx, client.ObjectKey{Name: "channels.podipc.dev"}, &apiextensionsv1.CustomResourceDefinition{}); err != nil {
		t.Errorf("uninstall removed the CRD (it must keep it, and with it users' Channels): %v", err)
	}
	if err := c.Get(ctx, client.ObjectKeyFromObject(ch), &podipcv1alpha1.Channel{}); err != nil {
		t.Errorf("uninstall removed the user's Channel: %v", err)
	}
}

func key(u *unstructured.Unstructured) types.NamespacedName {
	return types.NamespacedName{Namespace: u.GetNamespace(), Name: u.GetName()}
}

func emptyLike(u *unstructured.Unstructured) *unstructured.Unstructured {
	e := &unstructured.Unstructured{}
	e.SetGroupVersionKind(u.GroupVersionKind())
	return e
}
