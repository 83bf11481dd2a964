package inject

import (
	"fmt"

	"github.com/podipc/podipc/pkg/peertls"
)

// AnnotationPeerTLS lets a pod make its sidecar's peer TLS mode stricter than the
// controller's (Config.PeerTLS), never weaker: a pod author may opt in to Required while
// the cluster rolls through Permissive, but may not open a plaintext door the operator
// closed (docs/security.md, "Modes").
const AnnotationPeerTLS = "podipc.dev/peer-tls"

// EnvPeerTLS carries the mode to the sidecar (its --peer-tls default).
const EnvPeerTLS = "PODIPC_PEER_TLS"

// strictness orders the modes: a pod may only move up.
var strictness = map[peertls.Mode]int{peertls.Disabled: 0, peertls.Permissive: 1, peertls.Required: 2}

// peerTLS is the mode the pod's sidecar runs: the controller's, or the pod's stricter
// podipc.dev/peer-tls. It fails, with a message meant for the user, on a value that is not
// a mode, one weaker than the controller's, or TLS without workload identity.
func (c Config) peerTLS(annotations map[string]string) (peertls.Mode, error) {
	mode := c.PeerTLS
	if mode == "" {
		mode = peertls.Disabled
	}
	value, ok := annotations[AnnotationPeerTLS]
	if !ok {
		return mode, nil
	}
	asked, err := peertls.ParseMode(value)
	if err != nil {
		return "", fmt.Errorf("annotation %s=%w", AnnotationPeerTLS, err)
	}
	if strictness[asked] < strictness[mode] {
		return "", fmt.Errorf("annotation %s=%s is weaker than the cluster's peer TLS mode %s: a pod may only make it stricter "+
			"(the operator sets the mode with the chart's peerTLS value)", AnnotationPeerTLS, asked, mode)
	}
	if asked != peertls.Disabled && c.Identity == nil {
		return "", fmt.Errorf("annotation %s=%s needs a workload certificate, and podipc runs with workload identity off "+
			"(the chart's identity.enabled)", AnnotationPeerTLS, asked)
	}
	return asked, nil
}
