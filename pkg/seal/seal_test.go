package seal

import (
	"errors"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestCheck: a seal holds only for the namespace, account and channels it was made for,
// and only with the key that made it.
func TestCheck(t *testing.T) {
	key, _ := NewKey([]byte(strings.Repeat("a", 32)))
	other, _ := NewKey([]byte(strings.Repeat("b", 32)))
	pod := func(ns, sa, sealed string) *corev1.Pod {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Annotations: map[string]string{}}}
		p.Spec.ServiceAccountName = sa
		if sealed != "" {
			p.Annotations[Annotation] = sealed
		}
		return p
	}
	good := key.Sign("shop", "app", "events,orders")
	cases := map[string]struct {
		pod      *corev1.Pod
		channels []string
		want     error
	}{
		"the pod it was made for": {pod("shop", "app", good), []string{"events", "orders"}, nil},
		"default account":         {pod("shop", "", key.Sign("shop", "default", "orders")), []string{"orders"}, nil},
		"no seal":                 {pod("shop", "app", ""), []string{"events", "orders"}, ErrMissing},
		"another namespace":       {pod("evil", "app", good), []string{"events", "orders"}, ErrInvalid},
		"another account":         {pod("shop", "admin", good), []string{"events", "orders"}, ErrInvalid},
		"a channel added":         {pod("shop", "app", good), []string{"events", "orders", "payments"}, ErrInvalid},
		"channels reordered":      {pod("shop", "app", good), []string{"orders", "events"}, ErrInvalid},
		"made with another key":   {pod("shop", "app", other.Sign("shop", "app", "events,orders")), []string{"events", "orders"}, ErrInvalid},
		"not a seal":              {pod("shop", "app", "v1.AAAA"), []string{"events", "orders"}, ErrInvalid},
		"ambiguous concatenation": {pod("shop", "app", key.Sign("shop", "app,events", "orders")), []string{"events", "orders"}, ErrInvalid},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			if err := key.Check(tc.pod, tc.channels); !errors.Is(err, tc.want) {
				t.Fatalf("Check = %v, want %v", err, tc.want)
			}
		})
	}
	if _, err := NewKey(make([]byte, 16)); err == nil {
		t.Fatal("a 16-byte key was accepted")
	}
}
