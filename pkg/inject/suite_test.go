package inject

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"go.uber.org/zap/zapcore"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/pkg/channel"
)

// The one test environment of this package: a real kube-apiserver and etcd with the
// podipc-injector MutatingWebhookConfiguration from config/webhook installed, pointing at a
// manager that serves Webhook and runs MissingReconciler.
var (
	testEnv    *envtest.Environment
	restConfig *rest.Config
	k8sClient  client.Client
	testScheme = runtime.NewScheme()
	hook       *Webhook
	testConfig = Config{
		Image:               "ghcr.io/podipc/sidecar:test",
		PullPolicy:          corev1.PullIfNotPresent,
		ControllerNamespace: "podipc-system",
		Resources: corev1.ResourceRequirements{
			Requests: corev1.ResourceList{
				corev1.ResourceCPU:    resource.MustParse("50m"),
				corev1.ResourceMemory: resource.MustParse("32Mi"),
			},
			Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("128Mi")},
		},
	}
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	utilruntime.Must(clientgoscheme.AddToScheme(testScheme))
	utilruntime.Must(podipcv1alpha1.AddToScheme(testScheme))
	ctrl.SetLogger(zap.New(zap.WriteTo(os.Stderr), zap.UseDevMode(true), zap.Level(zapLevel())))

	testEnv = &envtest.Environment{
		BinaryAssetsDirectory: assetsDir(),
		CRDDirectoryPaths:     []string{filepath.Join("..", "..", "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
		WebhookInstallOptions: envtest.WebhookInstallOptions{
			Paths: []string{filepath.Join("..", "..", "config", "webhook")},
		},
	}
	var err error
	if restConfig, err = testEnv.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "starting the test API server (KUBEBUILDER_ASSETS or bin/k8s/v1.37.2, run 'make control-plane'): %v\n", err)
		return 1
	}
	defer func() {
		if err := testEnv.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "stopping the test API server: %v\n", err)
		}
	}()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()

	if k8sClient, err = client.New(restConfig, client.Options{Scheme: testScheme}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := k8sClient.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: testConfig.ControllerNamespace}}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	wo := testEnv.WebhookInstallOptions
	mgr, err := ctrl.NewManager(restConfig, ctrl.Options{
		Scheme: testScheme,
		// The controller's cache configuration, whose pod informer sees injected pods only.
		Cache:   cache.Options{ByObject: channel.CacheByObject()},
		Metrics: metricsserver.Options{BindAddress: "0"},
		WebhookServer: webhook.NewServer(webhook.Options{
			Host: wo.LocalServingHost, Port: wo.LocalServingPort, CertDir: wo.LocalServingCertDir,
		}),
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	hook = &Webhook{Reader: mgr.GetCache(), APIReader: mgr.GetAPIReader(), Config: testConfig}
	if err := hook.SetupWithManager(mgr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	missing := &MissingReconciler{
		Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(),
		Recorder: mgr.GetEventRecorder("podipc-injection-monitor"), ControllerNamespace: testConfig.ControllerNamespace,
	}
	if err := missing.SetupWithManager(mgr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := mgr.Start(ctx); err != nil {
			fmt.Fprintf(os.Stderr, "manager: %v\n", err)
			os.Exit(1)
		}
	}()
	if !mgr.GetCache().WaitForCacheSync(ctx) {
		fmt.Fprintln(os.Stderr, "cache did not sync")
		return 1
	}
	return m.Run()
}

// assetsDir finds the control-plane binaries: KUBEBUILDER_ASSETS (make test) or the cache
// that 'make control-plane' fills.
func assetsDir() string {
	if dir := os.Getenv("KUBEBUILDER_ASSETS"); dir != "" {
		return dir
	}
	return filepath.Join("..", "..", "bin", "k8s", "v1.37.2")
}

// zapLevel keeps test logs quiet unless PODIPC_TEST_VERBOSE is set.
func zapLevel() zapcore.Level {
	if os.Getenv("PODIPC_TEST_VERBOSE") != "" {
		return -4
	}
	return 2
}
