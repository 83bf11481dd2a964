package inject

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/podipc/podipc/pkg/peertls"
)

// TestPeerTLSReachesTheSidecar: every injected sidecar is told the controller's peer TLS
// mode in PODIPC_PEER_TLS; a pod may make its own stricter with podipc.dev/peer-tls, and a
// pod that asks for a weaker mode (a plaintext door the operator closed), a mode that does
// not exist, or TLS without workload identity is rejected with a message saying why.
func TestPeerTLSReachesTheSidecar(t *testing.T) {
	id := &Identity{URL: "https://podipc-identity.podipc-system.svc:443", TrustDomain: "cluster.local", TrustBundle: "podipc-system/podipc-identity-trust"}
	for _, tc := range []struct {
		name       string
		cluster    peertls.Mode
		identity   *Identity
		annotation string // "" for none
		want       peertls.Mode
		err        string
	}{
		{name: "the cluster's Required", cluster: peertls.Required, identity: id, want: peertls.Required},
		{name: "the cluster's Permissive", cluster: peertls.Permissive, identity: id, want: peertls.Permissive},
		{name: "identity off", identity: nil, want: peertls.Disabled},
		{name: "stricter during a rollout", cluster: peertls.Permissive, identity: id, annotation: "Required", want: peertls.Required},
		{name: "the same", cluster: peertls.Required, identity: id, annotation: "Required", want: peertls.Required},
		{name: "weaker: plaintext under Required", cluster: peertls.Required, identity: id, annotation: "Disabled",
			err: "annotation podipc.dev/peer-tls=Disabled is weaker than the cluster's peer TLS mode Required: a pod may only make it stricter"},
		{name: "weaker: Permissive under Required", cluster: peertls.Required, identity: id, annotation: "Permissive",
			err: "annotation podipc.dev/peer-tls=Permissive is weaker than the cluster's peer TLS mode Required"},
		{name: "not a mode", cluster: peertls.Required, identity: id, annotation: "off",
			err: `annotation podipc.dev/peer-tls="off": want Required, Permissive or Disabled`},
		{name: "TLS without identity", identity: nil, annotation: "Required",
			err: "annotation podipc.dev/peer-tls=Required needs a workload certificate, and podipc runs with workload identity off"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Config{Image: "podipc:test", PeerTLS: tc.cluster, Identity: tc.identity}
			pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "ns",
				Annotations: map[string]string{AnnotationInject: "true", AnnotationChannels: "orders"}},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "app"}}}}
			if tc.annotation != "" {
				pod.Annotations[AnnotationPeerTLS] = tc.annotation
			}
			err := c.Inject(pod)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one saying %q", err, tc.err)
				}
				if len(pod.Spec.InitContainers) != 0 {
					t.Errorf("rejected pod was injected anyway: %+v", pod.Spec.InitContainers)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, e := range pod.Spec.InitContainers[0].Env {
				if e.Name == EnvPeerTLS {
					got = append(got, e.Value)
				}
			}
			if len(got) != 1 || got[0] != string(tc.want) {
				t.Errorf("sidecar %s = %q, want %q once", EnvPeerTLS, got, tc.want)
			}
		})
	}
}
