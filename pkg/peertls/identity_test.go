package peertls_test

import (
	"crypto/x509"
	"net/url"
	"strings"
	"testing"

	"github.com/podipc/podipc/pkg/peertls"
)

func certWith(uris ...string) *x509.Certificate {
	c := &x509.Certificate{}
	for _, u := range uris {
		parsed, err := url.Parse(u)
		if err != nil {
			panic(err)
		}
		c.URIs = append(c.URIs, parsed)
	}
	return c
}

// TestVerify: a certificate is accepted for exactly the pod its pod URI names, and
// refused, with the reason, for any other or when its SANs are ambiguous.
func TestVerify(t *testing.T) {
	pod := peertls.Pod{TrustDomain: "cluster.local", Namespace: "shop", ServiceAccount: "orders", Name: "web-0", UID: "u-1"}
	good := certWith(func() []string {
		var out []string
		for _, u := range pod.URIs() {
			out = append(out, u.String())
		}
		return out
	}()...)
	if got := good.URIs[1].String(); got != "spiffe://cluster.local/ns/shop/pod/web-0/uid/u-1" {
		t.Fatalf("pod URI %s", got)
	}
	if got := good.URIs[0].String(); got != "spiffe://cluster.local/ns/shop/sa/orders" {
		t.Fatalf("service-account URI %s", got)
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
		{"pod URI alone", certWith("spiffe://cluster.local/ns/shop/pod/web-0/uid/u-1"), static, ""},
		{"another UID", good, peertls.Pod{Namespace: "shop", Name: "web-0", UID: "u-2"}, "certificate names pod shop/web-0 (UID u-1), expected shop/web-0 (UID u-2)"},
		{"another name", good, peertls.Pod{Namespace: "shop", Name: "web-1", UID: "u-1"}, "expected shop/web-1"},
		{"another namespace", good, peertls.Pod{Namespace: "dev", Name: "web-0", UID: "u-1"}, "expected dev/web-0"},
		{"another service account", good, peertls.Pod{Namespace: "shop", Name: "web-0", UID: "u-1", ServiceAccount: "admin"}, `service account "orders", expected "admin"`},
		{"another trust domain", good, peertls.Pod{TrustDomain: "other", Namespace: "shop", Name: "web-0", UID: "u-1"}, `trust domain "cluster.local", expected "other"`},
		{"no pod URI", certWith("spiffe://cluster.local/ns/shop/sa/orders"), static, "names no pod"},
		{"no URI", certWith(), static, "names no pod"},
		{"not spiffe", certWith("https://cluster.local/ns/shop/pod/web-0/uid/u-1"), static, "names no pod"},
		{"two pod URIs", certWith("spiffe://cluster.local/ns/shop/pod/web-0/uid/u-1", "spiffe://cluster.local/ns/shop/pod/web-9/uid/u-9"), static, "more than one pod"},
		{"empty UID", certWith("spiffe://cluster.local/ns/shop/pod/web-0/uid/"), peertls.Pod{Namespace: "shop", Name: "web-0"}, "empty"},
		{"service account of another namespace", certWith("spiffe://cluster.local/ns/dev/sa/orders", "spiffe://cluster.local/ns/shop/pod/web-0/uid/u-1"), static, "not of the pod's trust domain and namespace"},
		{"extra path segments", certWith("spiffe://cluster.local/ns/shop/pod/web-0/uid/u-1/x"), static, "names no pod"},
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
