package peertls

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// Pod is the workload identity a peer certificate names. Its encoding, in the
// certificate's URI SANs, is
//
//	spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>
//	spiffe://<trustDomain>/ns/<namespace>/pod/<name>/uid/<uid>
//
// the first the SPIFFE ID of the workload, the second the pod, which a peer checks
// against discovery's member (an EndpointSlice's targetRef: namespace, name, UID).
// URIs writes the format and Verify reads it; nothing else knows it.
type Pod struct {
	TrustDomain    string
	Namespace      string
	ServiceAccount string
	Name           string
	UID            string
}

// String names the pod for logs.
func (p Pod) String() string { return p.Namespace + "/" + p.Name + " (UID " + p.UID + ")" }

// URIs returns the URI SANs of a certificate for p: the service account's SPIFFE ID
// (omitted if p has no service account) and the pod's.
func (p Pod) URIs() []*url.URL {
	var out []*url.URL
	if p.ServiceAccount != "" {
		out = append(out, &url.URL{Scheme: "spiffe", Host: p.TrustDomain,
			Path: "/ns/" + p.Namespace + "/sa/" + p.ServiceAccount})
	}
	return append(out, &url.URL{Scheme: "spiffe", Host: p.TrustDomain,
		Path: "/ns/" + p.Namespace + "/pod/" + p.Name + "/uid/" + p.UID})
}

// Verify checks that cert names the pod want: its pod URI SAN must carry exactly want's
// namespace, name and UID, and, for each of want's trust domain and service account
// that is set, its SANs must carry that one too. Static discovery knows no service
// account, so an empty one is not compared. It returns why not, or nil.
func Verify(cert *x509.Certificate, want Pod) error {
	got, err := parse(cert)
	if err != nil {
		return err
	}
	switch {
	case got.Namespace != want.Namespace || got.Name != want.Name || got.UID != want.UID:
		return fmt.Errorf("certificate names pod %s, expected %s", got, want)
	case want.TrustDomain != "" && got.TrustDomain != want.TrustDomain:
		return fmt.Errorf("certificate is of trust domain %q, expected %q", got.TrustDomain, want.TrustDomain)
	case want.ServiceAccount != "" && got.ServiceAccount != want.ServiceAccount:
		return fmt.Errorf("certificate names service account %q, expected %q", got.ServiceAccount, want.ServiceAccount)
	}
	return nil
}

// parse reads the pod identity from cert's URI SANs. Exactly one pod URI is required;
// a service-account URI, if present, must be of the same trust domain and namespace.
func parse(cert *x509.Certificate) (Pod, error) {
	var p Pod
	pods := 0
	var sa *url.URL
	for _, u := range cert.URIs {
		if u.Scheme != "spiffe" {
			continue
		}
		parts := strings.Split(strings.TrimPrefix(u.Path, "/"), "/")
		switch {
		case len(parts) == 6 && parts[0] == "ns" && parts[2] == "pod" && parts[4] == "uid":
			pods++
			p.TrustDomain, p.Namespace, p.Name, p.UID = u.Host, parts[1], parts[3], parts[5]
		case len(parts) == 4 && parts[0] == "ns" && parts[2] == "sa":
			sa = u
		}
	}
	switch {
	case pods == 0:
		return Pod{}, errors.New("certificate names no pod (no spiffe://<trustDomain>/ns/<ns>/pod/<name>/uid/<uid> URI SAN)")
	case pods > 1:
		return Pod{}, errors.New("certificate names more than one pod")
	case p.Namespace == "" || p.Name == "" || p.UID == "":
		return Pod{}, errors.New("certificate's pod URI SAN has an empty namespace, name or UID")
	}
	if sa != nil {
		parts := strings.Split(strings.TrimPrefix(sa.Path, "/"), "/")
		if sa.Host != p.TrustDomain || parts[1] != p.Namespace {
			return Pod{}, fmt.Errorf("certificate's service account %s is not of the pod's trust domain and namespace", sa)
		}
		p.ServiceAccount = parts[3]
	}
	return p, nil
}
