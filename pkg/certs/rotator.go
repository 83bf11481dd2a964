package certs

import (
	"bytes"
	"context"
	"fmt"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/clock"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// The Secret's keys. tls.crt, tls.key and ca.crt follow the kubernetes.io/tls convention
// that cert-manager also uses.
const (
	keyCert       = "tls.crt"
	keyKey        = "tls.key"
	keyCACert     = "ca.crt"
	keyCAKey      = "ca.key"
	keyNextCACert = "next-ca.crt"
	keyNextCAKey  = "next-ca.key"
	keyBundle     = "ca-bundle.crt"
	// annotationPublished records when the bundle with the pending CA reached caBundle.
	annotationPublished = "podipc.dev/next-ca-published-at"
)

// Rotator keeps the Secret and the webhook configuration's caBundle in step with Plan. It
// runs on the leader only, so that one writer decides; Secret updates carry the
// resourceVersion they were planned from, so a stale leader's write fails rather than wins.
type Rotator struct {
	// Client reads and writes the Secret and the MutatingWebhookConfiguration directly (not
	// through the cache: two objects, read once per check).
	Client client.Client
	// Secret is the Secret holding State.
	Secret types.NamespacedName
	// WebhookConfig is the MutatingWebhookConfiguration whose every webhook gets caBundle.
	// It is not used when Publisher is set.
	WebhookConfig string
	// Publisher, when set, publishes the bundle instead of WebhookConfig: the workload
	// identity root uses the same rotation with its bundle published elsewhere.
	Publisher Publisher
	// Name names the certificate in logs; empty means "webhook serving certificate".
	Name string
	// Policy is the certificate lifetime policy.
	Policy Policy
	// CheckInterval bounds the time between checks (an edited caBundle is repaired within it).
	CheckInterval time.Duration
	// Clock is the time source; a fake clock drives rotation in tests.
	Clock clock.Clock
}

// Publisher makes a CA bundle trusted by whoever verifies the served certificates. Publish
// returns only once the bundle is in place: the propagation delay starts then.
type Publisher interface {
	Publish(ctx context.Context, bundle []byte) error
}

func (r *Rotator) name() string {
	if r.Name == "" {
		return "webhook serving certificate"
	}
	return r.Name
}

// NeedLeaderElection makes the Rotator run on the elected leader only.
func (r *Rotator) NeedLeaderElection() bool { return true }

// +kubebuilder:rbac:groups="",namespace=podipc-system,resources=secrets,verbs=get;list;watch;create;update
// The Keypair of every replica lists and watches the one Secret (by a field selector).
// +kubebuilder:rbac:groups=admissionregistration.k8s.io,resources=mutatingwebhookconfigurations,verbs=get;patch

// Start checks at once, then whenever the next step is due or CheckInterval has passed.
func (r *Rotator) Start(ctx context.Context) error {
	log := ctrl.LoggerFrom(ctx).WithName("cert-rotator")
	for {
		wait := r.CheckInterval
		if next, err := r.Sync(ctx); err != nil {
			log.Error(err, "Syncing the certificate failed", "certificate", r.name())
			wait = min(wait, 5*time.Second)
		} else if d := next.Sub(r.Clock.Now()); d < wait {
			wait = max(d, 10*time.Millisecond)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-r.Clock.After(wait):
		}
	}
}

// Sync performs one step: plan, write the Secret, publish the bundle, record the publishing
// time. It returns when the next step is due.
func (r *Rotator) Sync(ctx context.Context) (time.Time, error) {
	secret := &corev1.Secret{}
	exists := true
	if err := r.Client.Get(ctx, r.Secret, secret); apierrors.IsNotFound(err) {
		exists = false
		secret = &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: r.Secret.Namespace, Name: r.Secret.Name}, Type: corev1.SecretTypeTLS}
	} else if err != nil {
		return time.Time{}, err
	}
	cur := fromSecret(secret)
	next, err := Plan(r.Clock.Now(), cur, r.Policy)
	if err != nil {
		return time.Time{}, err
	}
	if !exists || !next.Equal(cur) {
		if err := r.write(ctx, secret, next, exists); err != nil {
			return time.Time{}, err
		}
		ctrl.LoggerFrom(ctx).Info("Updated the certificate Secret", "certificate", r.name(), "secret", r.Secret)
	}
	publish := r.publish
	if r.Publisher != nil {
		publish = r.Publisher.Publish
	}
	if err := publish(ctx, next.Bundle); err != nil {
		return time.Time{}, err
	}
	if len(next.NextCACert) > 0 && next.NextPublishedAt.IsZero() {
		// Only now, with the new CA in caBundle, does the propagation delay start.
		next.NextPublishedAt = r.Clock.Now()
		if err := r.write(ctx, secret, next, true); err != nil {
			return time.Time{}, err
		}
	}
	return NextAction(next, r.Policy), nil
}

func (r *Rotator) write(ctx context.Context, secret *corev1.Secret, s State, exists bool) error {
	toSecret(secret, s)
	if !exists {
		return r.Client.Create(ctx, secret)
	}
	return r.Client.Update(ctx, secret)
}

// publish sets caBundle on every webhook of the configuration, if it differs.
func (r *Rotator) publish(ctx context.Context, bundle []byte) error {
	cfg := &admissionregistrationv1.MutatingWebhookConfiguration{}
	if err := r.Client.Get(ctx, client.ObjectKey{Name: r.WebhookConfig}, cfg); err != nil {
		return fmt.Errorf("reading MutatingWebhookConfiguration %s: %w", r.WebhookConfig, err)
	}
	patched := cfg.DeepCopy()
	changed := false
	for i := range patched.Webhooks {
		if string(patched.Webhooks[i].ClientConfig.CABundle) != string(bundle) {
			patched.Webhooks[i].ClientConfig.CABundle = bundle
			changed = true
		}
	}
	if !changed {
		return nil
	}
	// The optimistic lock makes a concurrent edit (helm upgrade) retry on the next check
	// instead of being overwritten with a stale webhook list.
	if err := r.Client.Patch(ctx, patched, client.MergeFromWithOptions(cfg, client.MergeFromWithOptimisticLock{})); err != nil {
		return fmt.Errorf("publishing caBundle to %s: %w", r.WebhookConfig, err)
	}
	ctrl.LoggerFrom(ctx).Info("Published the webhook CA bundle", "mutatingWebhookConfiguration", r.WebhookConfig,
		"cas", bytes.Count(bundle, []byte("BEGIN CERTIFICATE")))
	return nil
}

func fromSecret(s *corev1.Secret) State {
	st := State{
		CACert: s.Data[keyCACert], CAKey: s.Data[keyCAKey],
		NextCACert: s.Data[keyNextCACert], NextCAKey: s.Data[keyNextCAKey],
		Cert: s.Data[keyCert], Key: s.Data[keyKey], Bundle: s.Data[keyBundle],
	}
	if t, err := time.Parse(time.RFC3339Nano, s.Annotations[annotationPublished]); err == nil {
		st.NextPublishedAt = t
	}
	return st
}

func toSecret(s *corev1.Secret, st State) {
	s.Data = map[string][]byte{
		keyCACert: st.CACert, keyCAKey: st.CAKey, keyCert: st.Cert, keyKey: st.Key, keyBundle: st.Bundle,
	}
	if len(st.NextCACert) > 0 {
		s.Data[keyNextCACert], s.Data[keyNextCAKey] = st.NextCACert, st.NextCAKey
	}
	if s.Annotations == nil {
		s.Annotations = map[string]string{}
	}
	delete(s.Annotations, annotationPublished)
	if !st.NextPublishedAt.IsZero() {
		s.Annotations[annotationPublished] = st.NextPublishedAt.UTC().Format(time.RFC3339Nano)
	}
}
