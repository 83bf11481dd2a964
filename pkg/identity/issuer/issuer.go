// Package issuer is the controller's identity endpoint: it verifies a sidecar's projected
// service-account token with a TokenReview and signs a workload certificate for the key
// in the sidecar's certificate signing request (see package identity for the certificate's
// form). Every controller replica runs one; they share the CA through a Secret that the
// leader keeps and rotates with pkg/certs (see Authority).
//
// The design follows Linkerd's identity controller and Istio's CA server: the caller is
// authenticated by the API server alone (TokenReview, with podipc's own audience, so a
// token meant for anything else is refused), the request decides nothing about the
// certificate but its public key, and every field of the certificate comes from what the
// API server says about the caller. Unlike both, a certificate names the pod (its UID)
// as well as its service account, and is issued only to a pod podipc injected that names
// at least one channel, so an identity is exactly a possible channel member.
//
// What is checked, in order, each refusal counted in podipc_identity_requests_total with
// its reason (identity.Result*) and logged:
//
//  1. the source address is not over its rate (rate_limited);
//  2. a bearer token (no_token) and a valid request with an ECDSA P-256 CSR whose
//     signature holds (bad_request);
//  3. TokenReview for audience podipc.dev/identity authenticates the token and reports
//     that audience (else wrong_audience, token_expired, pod_not_found or token_invalid:
//     the claims are decoded, unverified, only to name the reason);
//  4. the token is bound to a pod (not_pod_bound), the pod is not over its rate, and it is
//     the pod the request names (pod_mismatch);
//  5. the pod exists with that UID (pod_not_found) and runs as the token's service account
//     (pod_mismatch), carries a sidecar podipc injected and does not use the host network
//     (not_injected), and its sidecar names channels (no_channels).
package issuer

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/go-logr/logr"
	"golang.org/x/net/netutil"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/podipc/podipc/pkg/certs"
	"github.com/podipc/podipc/pkg/identity"
)

// Defaults of Server.
const (
	// DefaultLifetime is a workload certificate's life.
	DefaultLifetime = 24 * time.Hour
	// MinLifetime bounds Lifetime from below (the chart asks for at least ten minutes;
	// tests rotate in seconds).
	MinLifetime = time.Second
	// backdate tolerates clock skew between the controller and the nodes.
	backdate = 5 * time.Minute
	// maxBody bounds a request: a P-256 CSR and a pod name fit in far less.
	maxBody = 16 << 10
	// maxConns bounds the connections served at once. When every sidecar of a cluster
	// asks together (a node pool starting, the controller restarting), serving them all at
	// once shares the CPU and the TokenReviews among all of them, so that every one
	// finishes late, past its handshake timeout, and retries with backoff; the rest wait
	// in the listen backlog and are served first come first served (BenchmarkIssuance).
	maxConns = 64
)

// Admission decides whether a pod may hold an identity beyond what the issuer checks
// itself; it returns a reason (for the refusal message) when it may not. The controller
// plugs the seal check (package seal) in here.
type Admission func(pod *corev1.Pod) error

// +kubebuilder:rbac:groups=authentication.k8s.io,resources=tokenreviews,verbs=create
// The trust bundle ConfigMap (TrustBundle), in the controller's namespace only.
// +kubebuilder:rbac:groups="",namespace=podipc-system,resources=configmaps,verbs=get;create;update

// Server is the identity endpoint.
type Server struct {
	// Addr is the listen address, e.g. ":9444".
	Addr string
	// TrustDomain is the SPIFFE trust domain of issued certificates.
	TrustDomain string
	// Lifetime is how long a certificate lives (default DefaultLifetime); never past its CA.
	Lifetime time.Duration
	// Keypair serves the endpoint's TLS certificate and holds the CA that signs.
	Keypair *certs.Keypair
	// Reviewer creates TokenReviews (an uncached client).
	Reviewer client.Client
	// Pods reads pods: the manager's cache of injected pods first, then APIReader for a pod
	// the cache has not seen yet.
	Pods, APIReader client.Reader
	// ChannelsOf returns the channels a pod's injected sidecar names (channel.ChannelsOf).
	ChannelsOf func(*corev1.Pod) []string
	// Admit, if set, must accept the pod too.
	Admit Admission
	// SourceLimit and PodLimit are the per-caller rates; zero values take the defaults.
	SourceLimit, PodLimit Limit
	// Log receives every refusal with its reason.
	Log logr.Logger
	// Metrics counts requests by result.
	Metrics *Metrics

	bySource, byPod *limiter
	ln              net.Listener
}

// NeedLeaderElection lets every replica serve.
func (s *Server) NeedLeaderElection() bool { return false }

// Listen binds Addr, so that a port in use fails start-up; Start calls it if needed.
func (s *Server) Listen() error {
	if s.ln != nil {
		return nil
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(context.Background(), "tcp", s.Addr)
	if err != nil {
		return fmt.Errorf("identity endpoint: %w", err)
	}
	s.ln = ln
	return nil
}

// ListenAddr returns the bound address (after Listen).
func (s *Server) ListenAddr() net.Addr { return s.ln.Addr() }

// Start serves HTTPS until ctx ends, then shuts down within ten seconds.
func (s *Server) Start(ctx context.Context) error {
	if err := s.Listen(); err != nil {
		return err
	}
	if s.Lifetime == 0 {
		s.Lifetime = DefaultLifetime
	}
	if s.Lifetime < MinLifetime {
		return fmt.Errorf("identity: certificate lifetime %s is below %s", s.Lifetime, MinLifetime)
	}
	s.bySource = newLimiter(s.SourceLimit.orDefault(DefaultSourceLimit))
	s.byPod = newLimiter(s.PodLimit.orDefault(DefaultPodLimit))
	srv := &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       15 * time.Second,
		WriteTimeout:      15 * time.Second,
		IdleTimeout:       time.Minute,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          nil,
		// HTTP/1.1 only: HTTP/2's stream multiplexing and its history of resource-exhaustion
		// bugs buy nothing for one request per sidecar per half-life.
		TLSConfig: &tls.Config{
			MinVersion:     tls.VersionTLS13,
			GetCertificate: s.Keypair.GetCertificate,
			NextProtos:     []string{"http/1.1"},
		},
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
	// One request per connection (the client sends one per half-life): an idle kept-alive
	// connection would hold one of the maxConns slots for IdleTimeout.
	srv.SetKeepAlivesEnabled(false)
	done := make(chan error, 1)
	go func() { done <- srv.ServeTLS(netutil.LimitListener(s.ln, maxConns), "", "") }()
	s.Log.Info("Serving the identity endpoint", "address", s.ln.Addr().String(), "trustDomain", s.TrustDomain, "lifetime", s.Lifetime)
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
	}
	shutdown, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := srv.Shutdown(shutdown)
	if serveErr := <-done; !errors.Is(serveErr, http.ErrServerClosed) {
		err = errors.Join(err, serveErr)
	}
	return err
}

// refusal is a request turned down: what to count and log, and what to answer.
type refusal struct {
	status  int
	reason  string
	message string
}

func (r *refusal) Error() string { return r.reason + ": " + r.message }

func refuse(status int, reason, format string, args ...any) *refusal {
	return &refusal{status: status, reason: reason, message: fmt.Sprintf(format, args...)}
}

// ServeHTTP handles one certificate request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	source := sourceOf(r)
	log := s.Log.WithValues("source", source)
	resp, pod, err := s.handle(r, source)
	if err != nil {
		var ref *refusal
		if !errors.As(err, &ref) {
			ref = refuse(http.StatusServiceUnavailable, identity.ResultUnavailable, "%v", err)
		}
		s.Metrics.Requests.WithLabelValues(ref.reason).Inc()
		log.Info("Refused a workload certificate request", "reason", ref.reason, "message", ref.message, "pod", pod)
		writeJSON(w, ref.status, identity.Refusal{Reason: ref.reason, Message: ref.message})
		return
	}
	s.Metrics.Requests.WithLabelValues(identity.ResultIssued).Inc()
	log.V(1).Info("Issued a workload certificate", "pod", pod)
	writeJSON(w, http.StatusOK, resp)
}

// handle runs the checks of the package comment and signs. pod names the caller once
// known, for the log.
func (s *Server) handle(r *http.Request, source string) (_ *identity.Response, pod string, _ error) {
	if !s.bySource.allow(source, time.Now()) {
		return nil, "", refuse(http.StatusTooManyRequests, identity.ResultRateLimited, "too many requests from %s", source)
	}
	if r.Method != http.MethodPost || r.URL.Path != identity.CertificatePath {
		return nil, "", refuse(http.StatusBadRequest, identity.ResultBadRequest, "only POST %s is served", identity.CertificatePath)
	}
	req, pub, err := decodeRequest(r.Body)
	if req.Pod.Name != "" {
		pod = req.Pod.Namespace + "/" + req.Pod.Name
	}
	if err != nil {
		return nil, pod, err
	}
	token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || strings.TrimSpace(token) == "" {
		return nil, pod, refuse(http.StatusUnauthorized, identity.ResultNoToken,
			"no bearer token: present the pod's projected service-account token of audience %s", identity.Audience)
	}
	signer := s.Keypair.Signer()
	if signer == nil {
		return nil, pod, refuse(http.StatusServiceUnavailable, identity.ResultUnavailable, "the identity CA is not loaded yet")
	}
	caller, err := s.review(r.Context(), strings.TrimSpace(token))
	if err != nil {
		return nil, pod, err
	}
	if !s.byPod.allow(caller.uid, time.Now()) {
		return nil, pod, refuse(http.StatusTooManyRequests, identity.ResultRateLimited, "too many requests for pod %s/%s", caller.namespace, caller.pod)
	}
	if req.Pod.Namespace != caller.namespace || req.Pod.Name != caller.pod || req.Pod.UID != caller.uid {
		return nil, pod, refuse(http.StatusForbidden, identity.ResultPodMismatch,
			"the token is bound to pod %s/%s (UID %s), not to the pod the request names (UID %s)",
			caller.namespace, caller.pod, caller.uid, req.Pod.UID)
	}
	if err := s.checkPod(r.Context(), caller); err != nil {
		return nil, pod, err
	}
	certPEM, err := s.sign(signer, pub, caller, time.Now())
	if err != nil {
		return nil, pod, err
	}
	return &identity.Response{Certificate: string(certPEM), Bundle: string(signer.Bundle)}, pod, nil
}

// decodeRequest reads the body and checks the CSR: well-formed, self-signed by its key,
// ECDSA P-256.
func decodeRequest(body io.Reader) (identity.Request, *ecdsa.PublicKey, error) {
	var req identity.Request
	raw, err := io.ReadAll(io.LimitReader(body, maxBody+1))
	if err != nil || len(raw) > maxBody {
		return req, nil, refuse(http.StatusBadRequest, identity.ResultBadRequest, "the request body is unreadable or over %d bytes", maxBody)
	}
	if err := json.Unmarshal(raw, &req); err != nil {
		return req, nil, refuse(http.StatusBadRequest, identity.ResultBadRequest, "the request is not valid JSON: %v", err)
	}
	if req.Pod.Namespace == "" || req.Pod.Name == "" || req.Pod.UID == "" {
		return req, nil, refuse(http.StatusBadRequest, identity.ResultBadRequest, "the request must name the pod (namespace, name, uid)")
	}
	b, _ := pem.Decode([]byte(req.CSR))
	if b == nil || b.Type != "CERTIFICATE REQUEST" {
		return req, nil, refuse(http.StatusBadRequest, identity.ResultBadRequest, "csr is not a PEM CERTIFICATE REQUEST")
	}
	csr, err := x509.ParseCertificateRequest(b.Bytes)
	if err != nil {
		return req, nil, refuse(http.StatusBadRequest, identity.ResultBadRequest, "csr cannot be parsed: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return req, nil, refuse(http.StatusBadRequest, identity.ResultBadRequest, "csr signature does not hold: %v", err)
	}
	pub, ok := csr.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return req, nil, refuse(http.StatusBadRequest, identity.ResultBadRequest, "csr key must be ECDSA P-256")
	}
	return req, pub, nil
}

// caller is what the TokenReview says about the token's holder.
type caller struct {
	namespace, serviceAccount, pod, uid string
}

// review authenticates the token with the API server, for podipc's audience only.
func (s *Server) review(ctx context.Context, token string) (caller, error) {
	tr := &authenticationv1.TokenReview{Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: []string{identity.Audience}}}
	if err := s.Reviewer.Create(ctx, tr); err != nil {
		return caller{}, refuse(http.StatusServiceUnavailable, identity.ResultUnavailable, "TokenReview failed: %v", err)
	}
	if !tr.Status.Authenticated {
		return caller{}, s.whyUnauthenticated(ctx, token, tr.Status.Error)
	}
	// An authenticator that is not audience-aware authenticates without saying so; only
	// a review that names our audience counts.
	if !slices.Contains(tr.Status.Audiences, identity.Audience) {
		return caller{}, refuse(http.StatusUnauthorized, identity.ResultWrongAudience,
			"the token is not for audience %s (the API server reports %v)", identity.Audience, tr.Status.Audiences)
	}
	ns, sa, ok := parseServiceAccount(tr.Status.User.Username)
	if !ok {
		return caller{}, refuse(http.StatusForbidden, identity.ResultNotPodBound, "%q is not a service account", tr.Status.User.Username)
	}
	podName := first(tr.Status.User.Extra["authentication.kubernetes.io/pod-name"])
	podUID := first(tr.Status.User.Extra["authentication.kubernetes.io/pod-uid"])
	if podName == "" || podUID == "" {
		return caller{}, refuse(http.StatusForbidden, identity.ResultNotPodBound,
			"the token of %s/%s is not bound to a pod: use the projected token the sidecar is given", ns, sa)
	}
	return caller{namespace: ns, serviceAccount: sa, pod: podName, uid: podUID}, nil
}

// whyUnauthenticated names the reason a token was refused. The claims are read without
// verifying them, only to choose the reason; the decision was the API server's.
func (s *Server) whyUnauthenticated(ctx context.Context, token, apiMessage string) error {
	c, ok := unverifiedClaims(token)
	switch {
	case !ok:
	case c.Expiry != 0 && time.Unix(c.Expiry, 0).Before(time.Now()):
		return refuse(http.StatusUnauthorized, identity.ResultTokenExpired, "the token expired at %s", time.Unix(c.Expiry, 0).UTC())
	case !c.Audience.has(identity.Audience):
		return refuse(http.StatusUnauthorized, identity.ResultWrongAudience, "the token is for %v, not %s", []string(c.Audience), identity.Audience)
	case c.Kubernetes.Pod.Name != "":
		p := &corev1.Pod{}
		err := s.APIReader.Get(ctx, types.NamespacedName{Namespace: c.Kubernetes.Namespace, Name: c.Kubernetes.Pod.Name}, p)
		if apierrors.IsNotFound(err) || (err == nil && string(p.UID) != c.Kubernetes.Pod.UID) || (err == nil && p.DeletionTimestamp != nil) {
			return refuse(http.StatusUnauthorized, identity.ResultPodNotFound,
				"the token is bound to pod %s/%s (UID %s), which no longer exists", c.Kubernetes.Namespace, c.Kubernetes.Pod.Name, c.Kubernetes.Pod.UID)
		}
	}
	return refuse(http.StatusUnauthorized, identity.ResultTokenInvalid, "the API server did not authenticate the token: %s", apiMessage)
}

// checkPod applies the pod checks of step 5.
func (s *Server) checkPod(ctx context.Context, c caller) error {
	key := types.NamespacedName{Namespace: c.namespace, Name: c.pod}
	pod := &corev1.Pod{}
	err := s.Pods.Get(ctx, key, pod)
	if apierrors.IsNotFound(err) || (err == nil && string(pod.UID) != c.uid) {
		// The cache holds injected pods only, and may not have seen a new one yet.
		err = s.APIReader.Get(ctx, key, pod)
	}
	switch {
	case apierrors.IsNotFound(err):
		return refuse(http.StatusForbidden, identity.ResultPodNotFound, "pod %s does not exist", key)
	case err != nil:
		return refuse(http.StatusServiceUnavailable, identity.ResultUnavailable, "reading pod %s: %v", key, err)
	case string(pod.UID) != c.uid:
		return refuse(http.StatusForbidden, identity.ResultPodNotFound, "pod %s exists with UID %s, not %s (the token's pod was deleted)", key, pod.UID, c.uid)
	case serviceAccountOf(pod) != c.serviceAccount:
		return refuse(http.StatusForbidden, identity.ResultPodMismatch, "pod %s runs as service account %s, the token is %s's", key, serviceAccountOf(pod), c.serviceAccount)
	case pod.Spec.HostNetwork:
		return refuse(http.StatusForbidden, identity.ResultNotInjected, "pod %s uses the host network, which podipc never injects", klog.KObj(pod))
	case pod.Labels["podipc.dev/injected"] != "true":
		return refuse(http.StatusForbidden, identity.ResultNotInjected, "pod %s was not injected by podipc (no podipc.dev/injected=true label)", klog.KObj(pod))
	}
	if s.Admit != nil {
		if err := s.Admit(pod); err != nil {
			return refuse(http.StatusForbidden, identity.ResultNotInjected, "pod %s: %v", klog.KObj(pod), err)
		}
	}
	if len(s.ChannelsOf(pod)) == 0 {
		return refuse(http.StatusForbidden, identity.ResultNoChannels, "the sidecar of pod %s names no channel", klog.KObj(pod))
	}
	return nil
}

// sign issues the workload certificate for pub.
func (s *Server) sign(signer *certs.Signer, pub *ecdsa.PublicKey, c caller, now time.Time) ([]byte, error) {
	sn, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	notAfter := now.Add(s.Lifetime)
	if signer.Cert.NotAfter.Before(notAfter) {
		notAfter = signer.Cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: sn,
		NotBefore:    now.Add(-backdate),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	identity.Stamp(tmpl, s.TrustDomain, c.namespace, c.serviceAccount, c.uid)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer.Cert, pub, signer.Key)
	if err != nil {
		return nil, fmt.Errorf("signing: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		http.Error(w, "encoding the answer failed", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// sourceOf is the caller's IP address: the rate-limit key before authentication.
func sourceOf(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

func parseServiceAccount(username string) (namespace, name string, ok bool) {
	rest, ok := strings.CutPrefix(username, "system:serviceaccount:")
	if !ok {
		return "", "", false
	}
	namespace, name, ok = strings.Cut(rest, ":")
	return namespace, name, ok && namespace != "" && name != ""
}

func serviceAccountOf(pod *corev1.Pod) string {
	if pod.Spec.ServiceAccountName == "" {
		return "default"
	}
	return pod.Spec.ServiceAccountName
}

func first(v authenticationv1.ExtraValue) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}
