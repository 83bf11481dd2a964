// Package seal is the admission-time mark that makes a pod a possible channel member: the
// webhook seals every pod it injects with an HMAC over what membership rests on, and the
// controller (publishing members) and the identity endpoint (issuing certificates) accept
// only pods whose seal holds.
//
// Without it, anyone allowed to create pods could label one podipc.dev/injected=true and
// add a container named podipc-sidecar with PODIPC_CHANNELS of their choosing: the
// webhook skips pods already injected, and the controller would publish the pod. A seal
// cannot be made without the key, which only the controller holds (a Secret of its
// namespace).
//
// The seal covers the pod's namespace, service account and channels (PODIPC_CHANNELS),
// not its name or UID: at admission a pod created from a template has neither yet. So a
// seal copied from one pod onto another of the same namespace, account and channels holds
// — and grants nothing its creator could not have had by letting the webhook inject that
// pod, whose checks (Channel.spec.access among them) the seal attests were passed for
// exactly that account and those channels.
package seal

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// Annotation carries the seal on the pod.
const Annotation = "podipc.dev/seal"

// secretKey is the key's entry in its Secret.
const secretKey = "hmac.key"

// version prefixes the seal, so the scheme can change without old seals being misread.
const version = "v1."

// Key seals and checks pods.
type Key struct {
	key []byte
}

// NewKey wraps raw key bytes (at least 32).
func NewKey(raw []byte) (*Key, error) {
	if len(raw) < 32 {
		return nil, fmt.Errorf("seal: key of %d bytes, want at least 32", len(raw))
	}
	return &Key{key: raw}, nil
}

// Load reads the key from secret, creating the Secret with a fresh key if it does not
// exist. Every replica calls it at start; the key never changes afterwards, so there is
// nothing to watch. Two replicas creating at once are fine: the loser reads the winner's.
func Load(ctx context.Context, c client.Client, secret types.NamespacedName) (*Key, error) {
	s := &corev1.Secret{}
	err := c.Get(ctx, secret, s)
	if apierrors.IsNotFound(err) {
		raw := make([]byte, 32)
		if _, err := rand.Read(raw); err != nil {
			return nil, err
		}
		s = &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Namespace: secret.Namespace, Name: secret.Name,
				Labels: map[string]string{"app.kubernetes.io/part-of": "podipc"}},
			Type: corev1.SecretTypeOpaque,
			Data: map[string][]byte{secretKey: raw},
		}
		err = c.Create(ctx, s)
		if apierrors.IsAlreadyExists(err) {
			err = c.Get(ctx, secret, s)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("seal: reading the key Secret %s: %w", secret, err)
	}
	if len(s.Data[secretKey]) == 0 {
		// The chart creates the Secret empty (so helm owns and removes it); fill it once.
		raw := make([]byte, 32)
		if _, err := rand.Read(raw); err != nil {
			return nil, err
		}
		if s.Data == nil {
			s.Data = map[string][]byte{}
		}
		s.Data[secretKey] = raw
		// Update carries the resourceVersion read: if another replica filled it first,
		// this fails and the next read returns that replica's key.
		if err := c.Update(ctx, s); err != nil {
			if apierrors.IsConflict(err) {
				return Load(ctx, c, secret)
			}
			return nil, fmt.Errorf("seal: filling the key Secret %s: %w", secret, err)
		}
	}
	return NewKey(s.Data[secretKey])
}

// Sign returns the seal of a pod in namespace, running as serviceAccount, whose sidecar
// serves channels (the value of PODIPC_CHANNELS).
func (k *Key) Sign(namespace, serviceAccount, channels string) string {
	m := hmac.New(sha256.New, k.key)
	// NUL cannot occur in any of the three, so the encoding is unambiguous.
	m.Write([]byte("podipc-seal\x00" + namespace + "\x00" + serviceAccount + "\x00" + channels))
	return version + base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// Errors of Check.
var (
	ErrMissing = errors.New("the pod carries no podipc.dev/seal: it was not injected by this podipc")
	ErrInvalid = errors.New("the pod's podipc.dev/seal does not hold for its namespace, service account and channels")
)

// Check verifies the seal of pod, whose sidecar serves channels (PODIPC_CHANNELS, in the
// order the webhook wrote it).
func (k *Key) Check(pod *corev1.Pod, channels []string) error {
	got, ok := pod.Annotations[Annotation]
	if !ok || got == "" {
		return ErrMissing
	}
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	want := k.Sign(pod.Namespace, sa, strings.Join(channels, ","))
	if !strings.HasPrefix(got, version) || !hmac.Equal([]byte(got), []byte(want)) {
		return ErrInvalid
	}
	return nil
}
