package identity

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"strings"
	"testing"
	"time"
)

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t *testing.T) testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return testCA{cert: c, key: key}
}

// leaf issues a workload certificate as the issuer does, with edit applied to its template.
func (ca testCA) leaf(t *testing.T, ns, sa, uid string, edit func(*x509.Certificate)) []byte {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		NotBefore:    time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	Stamp(tmpl, "td", ns, sa, uid)
	if edit != nil {
		edit(tmpl)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// TestVerify checks that a peer's certificate is accepted only for the member it names,
// from the trusted root, in time, in the trust domain.
func TestVerify(t *testing.T) {
	ca, other := newTestCA(t), newTestCA(t)
	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)
	member := Pod{Namespace: "shop", Name: "a", UID: "uid-a"}
	cases := map[string]struct {
		chain [][]byte
		want  string // "" for accepted, else a part of the error
	}{
		"the member's certificate":  {chain: [][]byte{ca.leaf(t, "shop", "app", "uid-a", nil)}},
		"no certificate":            {want: "no certificate"},
		"another pod's certificate": {chain: [][]byte{ca.leaf(t, "shop", "app", "uid-b", nil)}, want: "not member"},
		"another namespace":         {chain: [][]byte{ca.leaf(t, "evil", "app", "uid-a", nil)}, want: "not member"},
		"another root":              {chain: [][]byte{other.leaf(t, "shop", "app", "uid-a", nil)}, want: "does not chain"},
		"expired": {chain: [][]byte{ca.leaf(t, "shop", "app", "uid-a", func(c *x509.Certificate) {
			c.NotBefore, c.NotAfter = time.Now().Add(-time.Hour), time.Now().Add(-time.Minute)
		})}, want: "does not chain"},
		"another trust domain": {chain: [][]byte{ca.leaf(t, "shop", "app", "uid-a", func(c *x509.Certificate) {
			c.URIs = []*url.URL{{Scheme: "spiffe", Host: "elsewhere", Path: "/ns/shop/sa/app"}}
		})}, want: "trust domain"},
		"two URI SANs": {chain: [][]byte{ca.leaf(t, "shop", "app", "uid-a", func(c *x509.Certificate) {
			c.URIs = append(c.URIs, SPIFFEID("td", "shop", "admin"))
		})}, want: "exactly one"},
		"not a workload path": {chain: [][]byte{ca.leaf(t, "shop", "app", "uid-a", func(c *x509.Certificate) {
			c.URIs = []*url.URL{{Scheme: "spiffe", Host: "td", Path: "/ns/shop"}}
		})}, want: "not of the form"},
		"a server-only certificate": {chain: [][]byte{ca.leaf(t, "shop", "app", "uid-a", func(c *x509.Certificate) {
			c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageCodeSigning}
		})}, want: "does not chain"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			p, err := Verify(tc.chain, roots, "td", member, time.Now())
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want == "" && (p.ServiceAccount != "app" || p.UID != "uid-a"):
				t.Fatalf("parsed %+v", p)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// TestParsePeerAnyTrustDomain: without a trust domain to hold it to (static mode),
// ParsePeer reads any SPIFFE ID's, and reports it; one without a trust domain is refused.
func TestParsePeerAnyTrustDomain(t *testing.T) {
	c := &x509.Certificate{}
	Stamp(c, "elsewhere", "shop", "app", "uid-a")
	p, err := ParsePeer(c, "")
	if err != nil || p.TrustDomain != "elsewhere" || p.Namespace != "shop" || p.ServiceAccount != "app" || p.UID != "uid-a" {
		t.Fatalf("ParsePeer = %+v, %v", p, err)
	}
	if _, err := ParsePeer(c, "td"); err == nil || !strings.Contains(err.Error(), `trust domain "td"`) {
		t.Fatalf("ParsePeer held to td: %v", err)
	}
	c.URIs = []*url.URL{{Scheme: "spiffe", Path: "/ns/shop/sa/app"}}
	if _, err := ParsePeer(c, ""); err == nil {
		t.Fatal("ParsePeer accepted a SPIFFE ID without a trust domain")
	}
}

func TestRenewalDelay(t *testing.T) {
	for range 100 {
		if d := renewalDelay(time.Hour); d < 24*time.Minute || d > 30*time.Minute {
			t.Fatalf("renewal after %s of an hour, want 40–50 %%", d)
		}
	}
}
