package inject

import (
	"fmt"
	"slices"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// SkipReason says why a pod that asked for the sidecar does not get it. The values are the
// `reason` label of podipc_webhook_skips_total and appear in the admission warning.
type SkipReason string

// The skip reasons, in the order Decide checks them.
const (
	SkipKubeSystem          SkipReason = "kube-system"
	SkipControllerNamespace SkipReason = "controller-namespace"
	SkipNamespaceDisabled   SkipReason = "namespace-disabled"
	SkipHostNetwork         SkipReason = "host-network"
	SkipAlreadyInjected     SkipReason = "already-injected"
)

// SkipReasons lists every SkipReason, for tests and metric initialisation.
var SkipReasons = []SkipReason{
	SkipKubeSystem, SkipControllerNamespace, SkipNamespaceDisabled, SkipHostNetwork, SkipAlreadyInjected,
}

// Decision is the outcome of Decide.
type Decision struct {
	// Requested is true when the pod asked for the sidecar, by its annotation or its
	// namespace's label, whether or not it gets it.
	Requested bool
	// Inject is true when the webhook must inject the sidecar.
	Inject bool
	// Skip is set when Requested but not Inject.
	Skip SkipReason
}

// Warning is the admission warning telling the user why a requested injection was skipped;
// empty when there is nothing to say.
func (d Decision) Warning() string {
	if d.Skip == "" {
		return ""
	}
	why := map[SkipReason]string{
		SkipKubeSystem:          "pods in kube-system are never injected",
		SkipControllerNamespace: "pods in the podipc controller's own namespace are never injected",
		SkipNamespaceDisabled:   fmt.Sprintf("the namespace is labelled %s=disabled", LabelNamespaceInject),
		SkipHostNetwork:         "hostNetwork pods are never injected (the sidecar's ports would collide on the node)",
		SkipAlreadyInjected:     fmt.Sprintf("the pod already has the %s container", SidecarName),
	}[d.Skip]
	return fmt.Sprintf("podipc: sidecar not injected (%s): %s", d.Skip, why)
}

// Decide says whether pod gets the sidecar, from the pod, the labels of its namespace and the
// controller's own namespace. namespace is the admission request's namespace (a pod's own
// metadata.namespace may still be empty at admission). It fails, with a message meant for
// the user, only on an invalid opt-in value; namespaces the webhook stays out of (kube-system,
// its own, disabled ones) are never rejected, so their pods are admitted untouched whatever
// their annotations say.
func Decide(pod *corev1.Pod, namespace string, nsLabels map[string]string, controllerNamespace string) (Decision, error) {
	podValue, podSet := pod.Annotations[AnnotationInject]
	nsValue := nsLabels[LabelNamespaceInject]
	d := Decision{Requested: podValue == "true" || (nsValue == "enabled" && podValue != "false")}

	switch namespace {
	case metav1.NamespaceSystem:
		return d.skip(SkipKubeSystem), nil
	case controllerNamespace:
		return d.skip(SkipControllerNamespace), nil
	}
	switch nsValue {
	case "", "enabled":
	case "disabled":
		return d.skip(SkipNamespaceDisabled), nil
	default:
		return Decision{}, fmt.Errorf("namespace %q has label %s=%q: the value must be \"enabled\" or \"disabled\"",
			namespace, LabelNamespaceInject, nsValue)
	}
	if podSet && podValue != "true" && podValue != "false" {
		return Decision{}, fmt.Errorf("annotation %s=%q is invalid: the value must be \"true\" or \"false\"",
			AnnotationInject, podValue)
	}
	switch {
	case !d.Requested:
		return d, nil
	case pod.Spec.HostNetwork:
		return d.skip(SkipHostNetwork), nil
	case Injected(pod):
		return d.skip(SkipAlreadyInjected), nil
	}
	d.Inject = true
	return d, nil
}

// skip records reason when the pod asked for the sidecar; a pod that did not ask is left
// alone without a word.
func (d Decision) skip(reason SkipReason) Decision {
	if d.Requested {
		d.Skip = reason
	}
	return d
}

// Injected reports whether pod already carries the sidecar, by its label or by a container
// of that name (a pod spec copied from an injected pod).
func Injected(pod *corev1.Pod) bool {
	if pod.Labels[LabelInjected] == "true" {
		return true
	}
	named := func(c corev1.Container) bool { return c.Name == SidecarName }
	return slices.ContainsFunc(pod.Spec.InitContainers, named) || slices.ContainsFunc(pod.Spec.Containers, named)
}
