// Package podnet gives one unprivileged process a pod network of its own: it re-executes
// the running binary in a new network namespace in which every address of CIDR is local,
// so that one machine can run many pods' processes on distinct, ordinary pod IPs.
//
// Why: the API server refuses loopback addresses (and link-local and unspecified ones) in
// EndpointSlices, and a sidecar accepts a peer link only from the member's own IP, so each
// pod played on one machine needs an address of its own that is bindable and not
// loopback. Without root, the only addresses a Linux machine routes to itself are
// 127.0.0.0/8 and its own few. So the demo and the sidecar integration tests call Run,
// which starts the same binary, with the same arguments and standard streams, in a new
// network namespace; the child sees Inside report true and calls Setup, which brings
// loopback up and routes CIDR to it as local addresses (the "AnyIP" route `local
// 10.244.0.0/16 dev lo`). Everything the child starts runs in that namespace: nothing on
// the machine's own network changes, and nothing inside can collide with its ports.
//
// Without root, Run also creates a new user namespace in which the caller is root, as
// rootless containers do: that root may configure the new network namespace and nothing
// outside it. This needs unprivileged user namespaces, which some systems disable; Run's
// error then says which setting allows them. Linux only: elsewhere Run and Setup fail.
//
// The typical main:
//
//	if !podnet.Inside() {
//		err := podnet.Run(nil, syscall.SIGTERM) // the child's status, or why it did not start
//		...
//	}
//	if err := podnet.Setup(); err != nil {
//		...
//	}
package podnet

import "os"

// CIDR is the pod range local inside the namespace (kind's pod range).
const CIDR = "10.244.0.0/16"

// NodeIP is the address of the node inside the namespace: the API server advertises it,
// as the namespace has no default route to take one from. No pod may have it.
const NodeIP = "10.244.0.1"

// markerEnv marks the re-executed child; its value is userNamespace or networkNamespace.
const markerEnv = "PODIPC_PODNET"

// The values of markerEnv: which namespaces the child was created in.
const (
	userNamespace    = "user+net"
	networkNamespace = "net"
)

// userNamespaceHelp says what to do where unprivileged user namespaces are disabled.
const userNamespaceHelp = `Without root, the pod network needs an unprivileged user namespace, as rootless containers
do, to give pods addresses of their own. Where they are disabled:
  Ubuntu 23.10+: sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0
  Debian <= 10:  sudo sysctl kernel.unprivileged_userns_clone=1
  RHEL 7:        sudo sysctl user.max_user_namespaces=15000
or run as root.`

// Inside reports whether this process is the child Run started, in the pod network.
func Inside() bool { return os.Getenv(markerEnv) != "" }

// UserNamespace reports whether this process is the child Run started and Run created a
// user namespace for it too (the parent was not root); nsenter must then enter both.
func UserNamespace() bool { return os.Getenv(markerEnv) == userNamespace }
