// Package nodedns tells the e2e suites whether the node of hack/node answers cluster DNS.
//
// Sidecars reach the controller's identity endpoint by its Service's DNS name
// (podipc-identity.<namespace>.svc), so mutual TLS on peer links, the chart's default,
// needs cluster DNS. The node of hack/node sets clusterDNS in the kubelet but runs no DNS
// server yet (hack/node/README.md): until it does, the suites install the chart with
// peerTLS=Disabled and skip the steps that prove mutual TLS on the node, saying why.
package nodedns

import (
	"context"
	"net"
	"time"
)

// Server is the cluster DNS address the kubelet of hack/node gives pods (CLUSTER_DNS in
// hack/node/lib.sh).
const Server = "10.97.0.10:53"

// Available reports whether Server resolves the API server's Service name.
func Available(ctx context.Context) bool {
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, Server)
	}}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	addrs, err := r.LookupHost(ctx, "kubernetes.default.svc.cluster.local")
	return err == nil && len(addrs) > 0
}

// ChartValues are the chart values a suite adds for the node: peerTLS=Disabled when the
// node has no cluster DNS.
func ChartValues(ctx context.Context) []string {
	if Available(ctx) {
		return nil
	}
	return []string{"--set", "peerTLS=Disabled"}
}

// SkipReason is what a step that proves mutual TLS on the node says when it is skipped.
const SkipReason = "the e2e node runs no cluster DNS (hack/node/README.md), so sidecars cannot reach the identity endpoint by its Service name and the suite runs with peerTLS=Disabled; mutual TLS is proven by pkg/identity/issuer TestSidecarsOverMTLS and pkg/sidecar TestMTLS* instead"
