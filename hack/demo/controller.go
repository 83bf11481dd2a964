package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/podipc/podipc/pkg/inject"
)

// The controller's namespace and names, as the Helm chart installs them.
const (
	controllerNamespace = "podipc-system"
	controllerAccount   = "podipc-controller"
	webhookConfigName   = "podipc-injector"
)

// controller is the podipc-controller process.
type controller struct {
	*proc
	// readyz is the URL of its readiness endpoint.
	readyz string
}

// installController does what `helm install` does, minus the Deployment and Service: the
// namespace, the RBAC of config/rbac bound to the controller's service account, and the
// MutatingWebhookConfiguration of config/webhook. Only the webhook's address differs: the
// API server calls it by URL on 127.0.0.1, as there is no Service network here.
func installController(ctx context.Context, c *cluster, root string, webhookPort int) error {
	cl := c.client()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: controllerNamespace}}
	if err := cl.Create(ctx, ns); err != nil {
		return err
	}
	for _, f := range []string{"role.yaml", "member_role.yaml", "slice_writer_role.yaml"} {
		if _, err := c.applyFile(ctx, filepath.Join(root, "config", "rbac", f), "", nil); err != nil {
			return err
		}
	}
	subject := []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: controllerNamespace, Name: controllerAccount}}
	ref := func(kind string) rbacv1.RoleRef {
		return rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: kind, Name: "podipc-controller"}
	}
	for _, b := range []client.Object{
		&rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "podipc-controller"}, Subjects: subject, RoleRef: ref("ClusterRole")},
		&rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Namespace: controllerNamespace, Name: "podipc-controller"}, Subjects: subject, RoleRef: ref("Role")},
	} {
		if err := cl.Create(ctx, b); err != nil {
			return err
		}
	}
	url := "https://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(webhookPort)) + inject.Path
	_, err := c.applyFile(ctx, filepath.Join(root, "config", "webhook", "manifests.yaml"), "", func(obj *unstructured.Unstructured) error {
		return pointWebhooksAt(obj, url)
	})
	return err
}

// pointWebhooksAt replaces every webhook's Service reference by url.
func pointWebhooksAt(obj *unstructured.Unstructured, url string) error {
	hooks, _, err := unstructured.NestedSlice(obj.Object, "webhooks")
	if err != nil {
		return err
	}
	for _, h := range hooks {
		if err := unstructured.SetNestedField(h.(map[string]any), map[string]any{"url": url}, "clientConfig"); err != nil {
			return err
		}
	}
	return unstructured.SetNestedSlice(obj.Object, hooks, "webhooks")
}

// startController runs bin/podipc-controller as its own service account, serving the
// webhook on 127.0.0.1:webhookPort with a certificate it manages itself, and waits until it
// is ready and has published its CA bundle into the webhook configuration. Until then the
// API server would skip the webhook (failurePolicy Ignore) and pods would go uninjected.
func startController(ctx context.Context, c *cluster, binDir, dir string, webhookPort int) (*controller, error) {
	kubeconfig := filepath.Join(dir, "controller.kubeconfig")
	if err := c.serviceAccountKubeconfig(ctx, controllerNamespace, controllerAccount, nil, kubeconfig); err != nil {
		return nil, err
	}
	probePort, err := freePort("127.0.0.1")
	if err != nil {
		return nil, err
	}
	p, err := startProc("podipc-controller", filepath.Join(dir, "controller.log"),
		nil, // no HOME either: a ~/.kube/config would not be read
		filepath.Join(binDir, "podipc-controller"),
		"--kubeconfig="+kubeconfig,
		"--namespace="+controllerNamespace,
		"--leader-elect=false", // one replica
		// As the chart's Deployment does: the controller binds podipc-slice-writer to its own
		// account in each Channel's namespace, its only right to write EndpointSlices.
		"--service-account="+controllerAccount,
		"--metrics-bind-address=0",
		"--health-probe-bind-address=127.0.0.1:"+strconv.Itoa(probePort),
		"--webhook-host=127.0.0.1",
		"--webhook-port="+strconv.Itoa(webhookPort),
		"--webhook-cert-extra-hosts=127.0.0.1",
		// The demo's sidecars run outside a cluster and have no projected identity token.
		// Without identity the controller injects plaintext (its --peer-tls=Required needs
		// identity); the demo's kubelet hands each sidecar certificate files and
		// --peer-tls=Required in place of the identity endpoint (startMember).
		"--identity-bind-address=0",
		"--peer-tls=Disabled",
		"--webhook-config-name="+webhookConfigName,
	)
	if err != nil {
		return nil, err
	}
	ctl := &controller{proc: p, readyz: fmt.Sprintf("http://127.0.0.1:%d/readyz", probePort)}
	hc := &http.Client{Timeout: 2 * time.Second}
	err = waitUntil(ctx, "the controller's /readyz and the webhook CA bundle", 90*time.Second, p, func(ctx context.Context) (bool, error) {
		if _, err := httpGet(ctx, hc, ctl.readyz); err != nil {
			return false, err
		}
		return caBundlePublished(ctx, c.client())
	})
	if err != nil {
		return nil, errors.Join(err, p.stop(10*time.Second))
	}
	return ctl, nil
}

// caBundlePublished reports whether every webhook of the configuration has a caBundle.
func caBundlePublished(ctx context.Context, cl client.Client) (bool, error) {
	cfg := &admissionregistrationv1.MutatingWebhookConfiguration{}
	if err := cl.Get(ctx, client.ObjectKey{Name: webhookConfigName}, cfg); err != nil {
		return false, err
	}
	for _, h := range cfg.Webhooks {
		if len(h.ClientConfig.CABundle) == 0 {
			return false, nil
		}
	}
	return true, nil
}
