package inject

import (
	"context"
	"os"
	"testing"

	"go.uber.org/zap/zapcore"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	"sigs.k8s.io/controller-runtime/pkg/webhook"

	"github.com/podipc/podipc/internal/testenv"
	"github.com/podipc/podipc/pkg/channel"
)

// The one test environment of this package: a real kube-apiserver and etcd with the
// podipc-injector MutatingWebhookConfiguration from config/webhook installed, pointing at a
// manager that serves Webhook and runs Monitor.
var (
	env        *testenv.Env
	hook       *Webhook
	testConfig = Config{
		Image:               "ghcr.io/podipc/sidecar:test",
		PullPolicy:          corev1.PullIfNotPresent,
		ControllerNamespace: "podipc-system",
		MaxProcs:            1,
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
	testenv.MainWith(m, &env, []testenv.Option{testenv.WithWebhooks()}, startInjector)
}

// startInjector creates the controller's namespace and runs a manager that serves Webhook
// at the address the installed webhook configuration calls, and runs Monitor.
func startInjector(e *testenv.Env) (func(), error) {
	ctrl.SetLogger(zap.New(zap.WriteTo(os.Stderr), zap.UseDevMode(true), zap.Level(zapLevel())))
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: testConfig.ControllerNamespace}}
	if err := e.Client.Create(context.Background(), ns); err != nil {
		return nil, err
	}
	wo := e.Environment.WebhookInstallOptions
	return e.StartManager(ctrl.Options{
		// The controller's cache configuration, whose pod informer sees injected pods only.
		Cache: cache.Options{ByObject: channel.CacheByObject()},
		WebhookServer: webhook.NewServer(webhook.Options{
			Host: wo.LocalServingHost, Port: wo.LocalServingPort, CertDir: wo.LocalServingCertDir,
		}),
	}, func(_ context.Context, mgr ctrl.Manager) error {
		hook = &Webhook{Reader: mgr.GetCache(), APIReader: mgr.GetAPIReader(), Config: testConfig}
		if err := hook.SetupWithManager(mgr); err != nil {
			return err
		}
		missing := &Monitor{
			Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(),
			Recorder: mgr.GetEventRecorder("podipc-injection-monitor"), ControllerNamespace: testConfig.ControllerNamespace,
		}
		return missing.SetupWithManager(mgr)
	})
}

// zapLevel keeps test logs quiet unless PODIPC_TEST_VERBOSE is set.
func zapLevel() zapcore.Level {
	if os.Getenv("PODIPC_TEST_VERBOSE") != "" {
		return -4
	}
	return 2
}
