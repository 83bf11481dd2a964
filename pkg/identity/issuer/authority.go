package issuer

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/podipc/podipc/pkg/certs"
	"github.com/podipc/podipc/pkg/identity"
)

// The trust anchor is pkg/certs's self-managed CA, used a second time: the leader's
// certs.Rotator keeps the identity root, its successor and the identity endpoint's serving
// certificate in a Secret of the controller's namespace, and publishes the bundle through
// TrustBundle instead of a webhook's caBundle; every replica's certs.Keypair serves that
// certificate and signs with the active root. Rotation keeps pkg/certs's invariant, which
// here reads: every sidecar trusts the root of every certificate any replica issues, and
// of the identity endpoint's serving certificate. A new root is added next to the old one
// in the bundle; only PropagationDelay after the bundle was published does it start to
// sign; the old root leaves the bundle only once it has expired, and no certificate it
// signed outlives it.

// RootPolicy is the rotation policy of the identity root for the identity endpoint's
// host names: a root of one year replaced 60 days ahead, an endpoint serving certificate of
// 30 days replaced 10 days ahead, and a new root published propagation before it signs.
// propagation must exceed the sidecars' bundle refresh (identity.DefaultBundleRefresh) by
// a wide margin: a sidecar that has not read the new bundle refuses peers whose
// certificates come from the new root.
func RootPolicy(hosts []string, propagation time.Duration) certs.Policy {
	const day = 24 * time.Hour
	return certs.Policy{
		Hosts:      hosts,
		CAValidity: 365 * day, CARenewBefore: 60 * day,
		CertValidity: 30 * day, CertRenewBefore: 10 * day,
		PropagationDelay: propagation,
		CAName:           "podipc-identity-root",
	}
}

// ValidatePolicy checks that a root policy leaves room for workload certificates of
// lifetime: the old root must be able to sign a full-length certificate until the new one
// takes over, or certificates issued near the switch would be cut short.
func ValidatePolicy(p certs.Policy, lifetime time.Duration) error {
	if err := p.Validate(); err != nil {
		return err
	}
	if p.CARenewBefore <= p.PropagationDelay+lifetime {
		return fmt.Errorf("identity root renew-before %s must exceed the propagation delay %s plus the certificate lifetime %s",
			p.CARenewBefore, p.PropagationDelay, lifetime)
	}
	return nil
}

// TrustBundle publishes the identity bundle as the ConfigMap sidecars read it from
// (identity.ConfigMapBundle). It is the Rotator's certs.Publisher.
type TrustBundle struct {
	// Client writes the ConfigMap (uncached: one object, written on change only).
	Client client.Client
	// ConfigMap is where the bundle goes, in the controller's namespace.
	ConfigMap types.NamespacedName
}

var _ certs.Publisher = (*TrustBundle)(nil)

// Publish implements certs.Publisher: it creates or updates the ConfigMap.
func (t *TrustBundle) Publish(ctx context.Context, bundle []byte) error {
	cm := &corev1.ConfigMap{}
	err := t.Client.Get(ctx, t.ConfigMap, cm)
	if apierrors.IsNotFound(err) {
		cm = &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Namespace: t.ConfigMap.Namespace, Name: t.ConfigMap.Name,
				Labels: map[string]string{"app.kubernetes.io/part-of": "podipc"}},
			Data: map[string]string{identity.BundleKey: string(bundle)},
		}
		if err := t.Client.Create(ctx, cm); err != nil {
			return fmt.Errorf("creating the trust bundle ConfigMap %s: %w", t.ConfigMap, err)
		}
		ctrl.LoggerFrom(ctx).Info("Published the identity trust bundle", "configMap", t.ConfigMap)
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading the trust bundle ConfigMap %s: %w", t.ConfigMap, err)
	}
	if cm.Data[identity.BundleKey] == string(bundle) {
		return nil
	}
	if cm.Data == nil {
		cm.Data = map[string]string{}
	}
	cm.Data[identity.BundleKey] = string(bundle)
	// Update carries the resourceVersion read: a concurrent writer makes this retry.
	if err := t.Client.Update(ctx, cm); err != nil {
		return fmt.Errorf("updating the trust bundle ConfigMap %s: %w", t.ConfigMap, err)
	}
	ctrl.LoggerFrom(ctx).Info("Published the identity trust bundle", "configMap", t.ConfigMap)
	return nil
}
