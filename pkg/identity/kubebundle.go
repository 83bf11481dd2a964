package identity

import (
	"context"
	"errors"
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
)

// BundleKey is the key of the trust bundle in its ConfigMap.
const BundleKey = "ca.crt"

var configMaps = schema.GroupVersionResource{Version: "v1", Resource: "configmaps"}

// ConfigMapBundle reads the trust bundle from the ConfigMap the controller publishes, in
// the controller's namespace, through the API server: the API server's own certificate
// authenticates it, so a sidecar needs nothing pre-shared to trust its first bundle. The
// chart lets every service account get that one ConfigMap (it holds public certificates
// only).
type ConfigMapBundle struct {
	// Client is a dynamic client (the sidecar links no typed API packages).
	Client dynamic.Interface
	// Namespace and Name locate the ConfigMap.
	Namespace, Name string
}

// Bundle implements BundleSource.
func (b ConfigMapBundle) Bundle(ctx context.Context) ([]byte, error) {
	u, err := b.Client.Resource(configMaps).Namespace(b.Namespace).Get(ctx, b.Name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("reading ConfigMap %s/%s: %w", b.Namespace, b.Name, err)
	}
	s, found, err := unstructured.NestedString(u.Object, "data", BundleKey)
	if err != nil || !found || s == "" {
		return nil, errors.Join(fmt.Errorf("ConfigMap %s/%s has no %s yet", b.Namespace, b.Name, BundleKey), err)
	}
	return []byte(s), nil
}
