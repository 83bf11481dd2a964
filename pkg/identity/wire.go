package identity

// Request is the JSON body of a POST to CertificatePath. The token travels in the
// Authorization header ("Bearer <token>"), never in the body, so it is not logged with it.
type Request struct {
	// CSR is a PEM certificate signing request for an ECDSA P-256 key. Only its public key
	// and signature are used: the issuer decides every field of the certificate itself.
	CSR string `json:"csr"`
	// Pod is the pod the sidecar believes it runs in (downward API). The issuer refuses the
	// request unless the token is bound to this very pod.
	Pod Pod `json:"pod"`
}

// Response is the JSON body of an issued certificate.
type Response struct {
	// Certificate is the PEM workload certificate (leaf only: it is signed by a root).
	Certificate string `json:"certificate"`
	// Bundle is the PEM trust bundle the issuer held when it signed.
	Bundle string `json:"bundle"`
}

// Refusal is the JSON body of every refused request: Reason is the value of the result
// label of podipc_identity_requests_total; Message says what to fix.
type Refusal struct {
	Reason  string `json:"reason"`
	Message string `json:"message"`
}

// Results of a certificate request: the result label of podipc_identity_requests_total
// and Refusal.Reason.
const (
	ResultIssued = "issued"
	// ResultBadRequest: not a POST of a valid Request with a P-256 CSR whose signature holds.
	ResultBadRequest = "bad_request"
	// ResultNoToken: no bearer token.
	ResultNoToken = "no_token"
	// ResultWrongAudience: the token is not for Audience.
	ResultWrongAudience = "wrong_audience"
	// ResultTokenExpired: the token has expired.
	ResultTokenExpired = "token_expired"
	// ResultPodNotFound: the token is bound to a pod that no longer exists (or exists with
	// another UID): deleted pods' tokens buy nothing.
	ResultPodNotFound = "pod_not_found"
	// ResultTokenInvalid: the API server did not authenticate the token for any other
	// reason (forged, signed by an unknown key, revoked); its message is logged.
	ResultTokenInvalid = "token_invalid"
	// ResultNotPodBound: the token authenticates but is not bound to a pod (a legacy
	// Secret token, a token requested without boundObjectRef).
	ResultNotPodBound = "not_pod_bound"
	// ResultPodMismatch: the token is bound to a pod other than the one the request names,
	// or the pod runs as another service account than the token's.
	ResultPodMismatch = "pod_mismatch"
	// ResultNotInjected: the pod does not carry a sidecar podipc injected (or uses the
	// host network), so it cannot be a member.
	ResultNotInjected = "not_injected"
	// ResultNoChannels: the pod's sidecar names no channel.
	ResultNoChannels = "no_channels"
	// ResultRateLimited: the caller (source address, or pod) asked too often.
	ResultRateLimited = "rate_limited"
	// ResultUnavailable: the issuer cannot answer now (no CA loaded yet, the API server
	// unreachable); the client retries.
	ResultUnavailable = "unavailable"
)
