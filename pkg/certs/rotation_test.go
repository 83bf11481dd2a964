package certs

import (
	"context"
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/utils/clock"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/pkg/inject"
)

// TestRotationUnderLoad serves the real injector with a self-managed certificate whose CA
// lives 8 s and is replaced 5 s before expiry, while pods are created without pause for three
// CA lifetimes. The webhook's failurePolicy is set to Fail, so any moment where the API server
// could not verify the served certificate fails a pod creation.
func TestRotationUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("rotates certificates in real time for ~25 s")
	}
	scheme := runtime.NewScheme()
	utilruntime.Must(clientgoscheme.AddToScheme(scheme))
	utilruntime.Must(podipcv1alpha1.AddToScheme(scheme))
	assets := os.Getenv("KUBEBUILDER_ASSETS")
	if assets == "" {
		assets = filepath.Join("..", "..", "bin", "k8s", "v1.37.2")
	}
	env := &envtest.Environment{
		BinaryAssetsDirectory: assets,
		CRDDirectoryPaths:     []string{filepath.Join("..", "..", "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
		WebhookInstallOptions: envtest.WebhookInstallOptions{Paths: []string{filepath.Join("..", "..", "config", "webhook")}},
	}
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("starting the test API server (run 'make control-plane'): %v", err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	ctrl.SetLogger(logr.Discard())
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })

	// Forget envtest's CA: from here on only the Rotator's bundle is trusted, with Fail.
	var whc admissionregistrationv1.MutatingWebhookConfiguration
	if err := c.Get(ctx, client.ObjectKey{Name: "podipc-injector"}, &whc); err != nil {
		t.Fatal(err)
	}
	for i := range whc.Webhooks {
		whc.Webhooks[i].ClientConfig.CABundle = nil
		whc.Webhooks[i].FailurePolicy = ptr.To(admissionregistrationv1.Fail)
	}
	if err := c.Update(ctx, &whc); err != nil {
		t.Fatal(err)
	}
	for _, ns := range []string{"podipc-system", "load"} {
		if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
			t.Fatal(err)
		}
	}

	secret := types.NamespacedName{Namespace: "podipc-system", Name: "podipc-webhook-tls"}
	clientset := kubernetes.NewForConfigOrDie(cfg)
	keypair := &Keypair{Clientset: clientset, Secret: secret}
	wo := env.WebhookInstallOptions
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:  scheme,
		Metrics: metricsserver.Options{BindAddress: "0"},
		WebhookServer: webhook.NewServer(webhook.Options{
			Host: wo.LocalServingHost, Port: wo.LocalServingPort, TLSOpts: []func(*tls.Config){keypair.TLSOption},
		}),
	})
	if err != nil {
		t.Fatal(err)
	}
	rotator := &Rotator{
		Client: c, Secret: secret, WebhookConfig: "podipc-injector", Clock: clock.RealClock{},
		CheckInterval: 200 * time.Millisecond,
		Policy: Policy{
			Hosts:      []string{wo.LocalServingHost},
			CAValidity: 8 * time.Second, CARenewBefore: 5 * time.Second,
			CertValidity: 4 * time.Second, CertRenewBefore: 2 * time.Second,
			PropagationDelay: time.Second,
		},
	}
	hook := &inject.Webhook{Reader: mgr.GetCache(), APIReader: mgr.GetAPIReader(), Config: inject.Config{Image: "sidecar:test", ControllerNamespace: "podipc-system"}}
	for _, add := range []error{mgr.Add(keypair), mgr.Add(rotator), hook.SetupWithManager(mgr)} {
		if add != nil {
			t.Fatal(add)
		}
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := mgr.Start(ctx); err != nil {
			t.Errorf("manager: %v", err)
		}
	}()

	// Wait for the first certificate to be served and trusted.
	deadline := time.Now().Add(30 * time.Second)
	for i := 0; ; i++ {
		pod := loadPod(fmt.Sprintf("warmup-%d", i))
		if err := c.Create(ctx, pod); err == nil && pod.Labels[inject.LabelInjected] == "true" {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("the webhook never became available: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	served := map[string]bool{}
	cas := map[string]bool{}
	created := 0
	for end := time.Now().Add(24 * time.Second); time.Now().Before(end); created++ {
		pod := loadPod(fmt.Sprintf("load-%d", created))
		if err := c.Create(ctx, pod); err != nil {
			t.Fatalf("pod %d: admission failed during rotation: %v", created, err)
		}
		if pod.Labels[inject.LabelInjected] != "true" {
			t.Fatalf("pod %d admitted without the sidecar", created)
		}
		if cert, err := keypair.GetCertificate(nil); err == nil {
			served[string(cert.Certificate[0])] = true
		}
		var s corev1.Secret
		if err := c.Get(ctx, secret, &s); err == nil {
			cas[string(s.Data[keyCACert])] = true
		}
	}
	t.Logf("%d pods admitted across %d CAs and %d serving certificates", created, len(cas), len(served))
	if len(cas) < 3 || len(served) < 4 {
		t.Fatalf("only %d CAs and %d serving certificates were used: rotation did not happen under load", len(cas), len(served))
	}
}

func loadPod(name string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "load", Name: name, Annotations: map[string]string{inject.AnnotationInject: "true"}},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "app:1"}}},
	}
}
