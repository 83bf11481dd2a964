package inject

// The public names of docs/design.md §3; renaming any of them needs a migration note.
const (
	// AnnotationInject opts a pod in ("true") or out ("false"); the pod's "false" wins over
	// its namespace's label.
	AnnotationInject = "podipc.dev/inject"
	// LabelNamespaceInject on a namespace opts every pod in ("enabled") or keeps the webhook
	// out of the namespace ("disabled").
	LabelNamespaceInject = "podipc.dev/inject"
	// AnnotationChannels lists the channels a pod joins, read once at admission.
	AnnotationChannels = "podipc.dev/channels"
	// LabelInjected is the label the webhook adds to every pod it injects.
	LabelInjected = "podipc.dev/injected"

	// AnnotationCPURequest and its siblings override the sidecar's configured resources.
	AnnotationCPURequest = "podipc.dev/sidecar-cpu-request"
	// AnnotationCPULimit overrides the sidecar's CPU limit.
	AnnotationCPULimit = "podipc.dev/sidecar-cpu-limit"
	// AnnotationMemoryRequest overrides the sidecar's memory request.
	AnnotationMemoryRequest = "podipc.dev/sidecar-memory-request"
	// AnnotationMemoryLimit overrides the sidecar's memory limit.
	AnnotationMemoryLimit = "podipc.dev/sidecar-memory-limit"

	// SidecarName is the name of the injected container.
	SidecarName = "podipc-sidecar"
	// SidecarCommand is the sidecar binary's path in its image.
	SidecarCommand = "/podipc-sidecar"
	// PeerPortName and PeerPort are the sidecar-to-sidecar port.
	PeerPortName = "podipc-peer"
	// PeerPort is the sidecar-to-sidecar port number.
	PeerPort = 7701
	// AdminPortName and AdminPort serve /healthz, /readyz and /metrics.
	AdminPortName = "podipc-admin"
	// AdminPort is the admin port number.
	AdminPort = 7702

	// SocketsVolume is the emptyDir shared by the sidecar and every container of the pod.
	SocketsVolume = "podipc-sockets"
	// SocketDir is where SocketsVolume is mounted in every container.
	SocketDir = "/var/run/podipc"
	// TokenVolume is the projected service-account token mounted into the sidecar alone.
	TokenVolume = "podipc-token"
	// TokenDir is the conventional in-cluster credentials path client-go reads.
	TokenDir = "/var/run/secrets/kubernetes.io/serviceaccount"

	// Env names of the sidecar's contract.
	EnvPodName      = "PODIPC_POD_NAME"
	EnvPodNamespace = "PODIPC_POD_NAMESPACE"
	EnvPodUID       = "PODIPC_POD_UID"
	EnvPodIP        = "PODIPC_POD_IP"
	EnvChannels     = "PODIPC_CHANNELS"
	// EnvMemoryLimit is the sidecar container's limits.memory in bytes (downward API),
	// which sets its Go soft limit and memory budget (docs/design.md §8.7).
	EnvMemoryLimit = "PODIPC_MEMORY_LIMIT"

	// Env names of the sidecar's workload identity, set when the controller issues one.
	EnvIdentityURL = "PODIPC_IDENTITY_URL"
	EnvTrustDomain = "PODIPC_TRUST_DOMAIN"
	EnvTrustBundle = "PODIPC_TRUST_BUNDLE"
	// IdentityTokenPath is the identity token's file in TokenDir (the sidecar's
	// --identity-token-file default).
	IdentityTokenPath = "podipc-identity-token"
	// identityTokenSeconds is the identity token's lifetime, the shortest the API server
	// allows; the kubelet replaces it at 80 %.
	identityTokenSeconds = 600
)
