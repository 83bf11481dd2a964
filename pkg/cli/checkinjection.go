package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"
)

// The injection contract (docs/design.md §3.1).
const (
	injectAnnotation   = "podipc.dev/inject"
	channelsAnnotation = "podipc.dev/channels"
	injectedLabel      = "podipc.dev/injected"
	sidecarName        = "podipc-sidecar"
)

// errNotInjected says the API server admitted the probe pod without a sidecar.
var errNotInjected = errors.New("the pod was admitted without the " + sidecarName + " init container")

func newCheckInjectionCommand(streams Streams) *cobra.Command {
	var o kubeOptions
	var timeout time.Duration
	var channel string
	cmd := &cobra.Command{
		Use:   "check-injection",
		Short: "Prove that the podipc webhook injects the sidecar",
		Long: `check-injection asks the API server to create a pod annotated podipc.dev/inject: "true"
as a server-side dry run (nothing is stored, nothing runs) and checks that the pod it gets
back carries the podipc-sidecar native sidecar (an init container with restartPolicy
Always). It retries until --timeout, since a freshly installed webhook needs a moment to
get its certificate, and exits non-zero if injection never happened.

It needs only permission to create pods in the namespace; the chart's helm test runs it.
The webhook's admission warnings (why it skipped a pod) are printed on standard error.`,
		Example: `  # after helm install
  podipc check-injection -n default

  # in a namespace of yours, waiting at most 10 seconds
  podipc check-injection -n shop --timeout 10s`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cs, ns, err := o.clientset(streams)
			if err != nil {
				return err
			}
			return checkInjection(cmd.Context(), cs, ns, channel, timeout, 2*time.Second, streams.Out)
		},
	}
	o.addFlags(cmd.Flags())
	cmd.Flags().DurationVar(&timeout, "timeout", 30*time.Second, "how long to keep trying")
	cmd.Flags().StringVar(&channel, "channel", "podipc-check", "channel named in the probe pod's podipc.dev/channels annotation (it need not exist)")
	return cmd
}

// probePod is the pod check-injection dry-runs: annotated for injection, and restricted
// so a namespace enforcing the restricted Pod Security Standard admits it.
func probePod(ns, channel string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			GenerateName: "podipc-check-injection-",
			Namespace:    ns,
			Labels:       map[string]string{"app.kubernetes.io/name": "podipc-check-injection"},
			Annotations:  map[string]string{injectAnnotation: "true", channelsAnnotation: channel},
		},
		Spec: corev1.PodSpec{
			RestartPolicy:                corev1.RestartPolicyNever,
			AutomountServiceAccountToken: ptr.To(false),
			SecurityContext: &corev1.PodSecurityContext{
				RunAsNonRoot:   ptr.To(true),
				RunAsUser:      ptr.To[int64](65532),
				SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
			},
			Containers: []corev1.Container{{
				Name:  "app",
				Image: "registry.k8s.io/pause:3.10",
				SecurityContext: &corev1.SecurityContext{
					AllowPrivilegeEscalation: ptr.To(false),
					Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
				},
			}},
		},
	}
}

// checkInjection dry-runs the probe pod every interval until it comes back injected or
// timeout passes.
func checkInjection(ctx context.Context, cs kubernetes.Interface, ns, channel string, timeout, interval time.Duration, out io.Writer) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for attempt := 1; ; attempt++ {
		pod, err := cs.CoreV1().Pods(ns).Create(ctx, probePod(ns, channel), metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		if err == nil {
			err = injected(pod)
			if err == nil {
				_, _ = fmt.Fprintf(out, "Injection works: a pod annotated %s=true in namespace %s gets the %s sidecar (attempt %d).\n", injectAnnotation, ns, sidecarName, attempt)
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last attempt: %w); check the controller in the release namespace (kubectl get pods,events) and that namespace %s is not excluded from the webhook", ctx.Err(), err, ns)
		case <-time.After(interval):
		}
	}
}

// injected checks the admitted pod against the injection contract.
func injected(pod *corev1.Pod) error {
	for _, c := range pod.Spec.InitContainers {
		if c.Name != sidecarName {
			continue
		}
		if c.RestartPolicy == nil || *c.RestartPolicy != corev1.ContainerRestartPolicyAlways {
			return fmt.Errorf("the %s init container is not a native sidecar (restartPolicy Always)", sidecarName)
		}
		if pod.Labels[injectedLabel] != "true" {
			return fmt.Errorf("the pod got the %s container but not the label %s=true", sidecarName, injectedLabel)
		}
		return nil
	}
	return errNotInjected
}
