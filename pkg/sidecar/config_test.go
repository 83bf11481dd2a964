package sidecar

import (
	"strings"
	"testing"

	"github.com/podipc/podipc/pkg/peertls"
)

// TestPeerTLSDefault: the peer links' mode a sidecar runs when the operator does not say,
// and how the webhook's $PODIPC_PEER_TLS and --peer-tls set it. In Kubernetes mode with an
// identity URL (what the webhook injects with identity on) mutual TLS is Required.
func TestPeerTLSDefault(t *testing.T) {
	kube := []string{"--discovery=kubernetes"}
	identity := []string{"--discovery=kubernetes", "--identity-url=https://podipc-identity.podipc-system.svc:443",
		"--trust-domain=cluster.local", "--trust-bundle=podipc-system/podipc-identity-trust"}
	for _, tc := range []struct {
		name string
		args []string
		env  string
		want peertls.Mode
		err  string
	}{
		{name: "identity URL, nothing said", args: identity, want: peertls.Required},
		{name: "identity URL, webhook says Permissive", args: identity, env: "Permissive", want: peertls.Permissive},
		{name: "identity URL, webhook says Disabled", args: identity, env: "Disabled", want: peertls.Disabled},
		{name: "the flag wins over the env", args: append(identity, "--peer-tls=Required"), env: "Permissive", want: peertls.Required},
		{name: "no certificate source (identity off)", args: kube, want: peertls.Disabled},
		{name: "webhook says Required, no certificate source", args: kube, env: "Required", err: "--peer-tls=Required needs a certificate"},
		{name: "webhook says nonsense", args: identity, env: "Strict", err: `--peer-tls="Strict": want Required, Permissive or Disabled`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := map[string]string{"PODIPC_POD_NAMESPACE": "ns", "PODIPC_POD_NAME": "p", "PODIPC_POD_UID": "u",
				"PODIPC_POD_IP": "10.0.0.1", EnvPeerTLS: tc.env}
			c, err := ParseConfig(tc.args, func(k string) string { return env[k] })
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one saying %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.PeerTLS != tc.want {
				t.Errorf("peer TLS %s, want %s", c.PeerTLS, tc.want)
			}
		})
	}
}
