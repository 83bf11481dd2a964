package peertls_test

import (
	"crypto/x509"
	"net/url"
	"strings"
	"testing"

	"github.com/podipc/podipc/pkg/identity"
	"github.com/podipc/podipc/pkg/peertls"
)

// certFor is a certificate written by identity.Stamp, the one writer of the format.
func certFor(td, ns, sa, uid string) *x509.Certificate {
	c := &x509.Certificate{}
	identity.Stamp(c, td, ns, sa, uid)
	return c
}

// certWith is a certificate with the URI SANs and common name given, for malformed ones.
func certWith(cn string, uris ...string) *x509.Certificate {
	c := &x509.Certificate{}
	c.Subject.CommonName = cn
	for _, u := range uris {
		parsed, err := url.Parse(u)
		if err != nil {
			panic(err)
		}
		c.URIs = append(c.URIs, parsed)
	}
	return c
}

// TestVerify: a certificate is accepted for exactly the pod (namespace, UID) it names,
// with the service account and trust domain compared when known, and refused, with the
// reason, for any other or when its SANs are not one SPIFFE ID.
func TestVerify(t *testing.T) {
	pod := peertls.Pod{TrustDomain: "cluster.local", Namespace: "shop", ServiceAccount: "orders", Name: "web-0", UID: "u-1"}
	good := certFor("cluster.local", "shop", "orders", "u-1")
	if len(good.URIs) != 1 || good.URIs[0].String() != "spiffe://cluster.local/ns/shop/sa/orders" || good.Subject.CommonName != "u-1" {
		t.Fatalf("format: URIs %v, CN %q", good.URIs, good.Subject.CommonName)
	}
	static := peertls.Pod{Namespace: "shop", Name: "web-0", UID: "u-1"} // what static discovery knows
	for _, tc := range []struct {
		name string
		cert *x509.Certificate
		want peertls.Pod
		err  string // "" accepts
	}{
		{"the pod itself", good, pod, ""},
		{"as static discovery knows it", good, static, ""},
		{"any trust domain when none is known", certFor("elsewhere", "shop", "orders", "u-1"), static, ""},
		{"another UID", good, peertls.Pod{Namespace: "shop", Name: "web-0", UID: "u-2"}, "certificate names pod UID u-1 in namespace shop, expected shop/web-0 (UID u-2)"},
		{"another namespace", good, peertls.Pod{Namespace: "dev", Name: "web-0", UID: "u-1"}, "expected dev/web-0"},
		{"another service account", good, peertls.Pod{Namespace: "shop", Name: "web-0", UID: "u-1", ServiceAccount: "admin"}, `certificate names service account "orders", but the controller publishes member shop/web-0 (UID u-1) as running as "admin"`},
		{"another trust domain", good, peertls.Pod{TrustDomain: "other", Namespace: "shop", Name: "web-0", UID: "u-1"}, `not a SPIFFE ID of trust domain "other"`},
		{"no UID", certWith("", "spiffe://cluster.local/ns/shop/sa/orders"), static, "names no pod UID"},
		{"no URI", certWith("u-1"), static, "0 URI SANs"},
		{"not spiffe", certWith("u-1", "https://cluster.local/ns/shop/sa/orders"), static, "not a SPIFFE ID"},
		{"no trust domain", certWith("u-1", "spiffe:///ns/shop/sa/orders"), static, "not a SPIFFE ID"},
		{"two URIs", certWith("u-1", "spiffe://cluster.local/ns/shop/sa/orders", "spiffe://cluster.local/ns/shop/sa/admin"), static, "2 URI SANs"},
		{"the former two-SAN pod URI", certWith("web-0", "spiffe://cluster.local/ns/shop/pod/web-0/uid/u-1"), static, "not of the form"},
		{"extra path segments", certWith("u-1", "spiffe://cluster.local/ns/shop/sa/orders/x"), static, "not of the form"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := peertls.Verify(tc.cert, tc.want)
			switch {
			case tc.err == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.err != "" && err == nil:
				t.Fatal("accepted")
			case tc.err != "" && !strings.Contains(err.Error(), tc.err):
				t.Fatalf("error %q does not say %q", err, tc.err)
			}
		})
	}
}

func TestParseMode(t *testing.T) {
	for _, s := range []string{"Required", "Permissive", "Disabled"} {
		if m, err := peertls.ParseMode(s); err != nil || string(m) != s {
			t.Fatalf("ParseMode(%q) = %q, %v", s, m, err)
		}
	}
	if _, err := peertls.ParseMode("required"); err == nil {
		t.Fatal("ParseMode accepted a lower-case mode")
	}
}
