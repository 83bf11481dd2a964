// Package inject puts the podipc sidecar into pods. Its mutating admission webhook decides
// whether a pod gets the sidecar and, if so, adds it as a native sidecar together with the
// shared sockets volume and the sidecar's own service-account token (docs/design.md §3.1
// and §6.2); its injection monitor flags pods that asked for the sidecar and were admitted
// without it (docs/design.md §6.3).
//
// The webhook works in two steps that are kept apart on purpose: [Decide] is a pure function
// of the pod, its namespace's labels and the controller's namespace, and says whether to inject
// and, when not, why ([SkipReason]); [Config.Inject] then changes the pod. Both are pure, so the
// truth table and the golden JSON patches are tested without an API server, while the
// [Webhook] type wires them to controller-runtime's typed defaulter and to the manager's cache
// (namespaces for their labels, Channels for the localPort clash check).
//
// The webhook is called only for pods that concern it: the MutatingWebhookConfiguration under
// config/webhook has one entry for namespaces labelled podipc.dev/inject=enabled and one, with a
// CEL match condition, for pods carrying the podipc.dev/inject annotation anywhere else. So a
// webhook outage with failurePolicy Fail blocks only pods that asked for podipc, and a pod that
// asked for injection in a skipped namespace (kube-system, the controller's own, a disabled one)
// still reaches the webhook and is told why in an admission warning.
//
// A webhook that is down with failurePolicy Ignore lets opted-in pods through without the
// sidecar; the [Monitor], a controller of its own in monitor.go, notices them (an
// InjectionMissing Event on the pod and the InjectionHealthy condition on their Channels)
// so that this is never silent.
package inject
