package inject

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/utils/ptr"

	"github.com/podipc/podipc/pkg/identity"
	"github.com/podipc/podipc/pkg/peertls"
	"github.com/podipc/podipc/pkg/seal"
)

// Config is what the controller's flags say about the injected sidecar.
type Config struct {
	// Image is the sidecar image reference.
	Image string
	// PullPolicy is the sidecar's image pull policy; empty leaves the API server's default.
	PullPolicy corev1.PullPolicy
	// Resources are the sidecar's default requests and limits; the pod's
	// podipc.dev/sidecar-* annotations override them one by one.
	Resources corev1.ResourceRequirements
	// ControllerNamespace is the controller's own namespace, never injected.
	ControllerNamespace string
	// Identity, if set, gives the sidecar a workload certificate: the webhook projects an
	// identity token and tells the sidecar where to ask.
	Identity *Identity
	// PeerTLS is every injected sidecar's peer TLS mode (PODIPC_PEER_TLS); a pod may make
	// it stricter with podipc.dev/peer-tls. Empty means Disabled. Required and Permissive
	// need Identity.
	PeerTLS peertls.Mode
	// MaxProcs is every injected sidecar's GOMAXPROCS (PODIPC_MAX_PROCS); a pod may say
	// otherwise with podipc.dev/sidecar-max-procs. 0 leaves the Go runtime's choice.
	MaxProcs int
	// Seal, if set, seals every injected pod (podipc.dev/seal), which the controller and
	// the identity endpoint require of members.
	Seal *seal.Key
}

// Identity is where an injected sidecar obtains its workload certificate.
type Identity struct {
	// URL is the identity endpoint (the chart's Service).
	URL string
	// TrustDomain is the SPIFFE trust domain.
	TrustDomain string
	// TrustBundle is the trust bundle ConfigMap, as <namespace>/<name>.
	TrustBundle string
}

// sidecarUID is the non-root user (and group) the sidecar runs as: distroless "nonroot".
const sidecarUID = 65532

// Inject adds the sidecar to pod, which Decide said to inject. It fails, with a message meant
// for the user, on an invalid resource annotation or channel name, or when the pod already
// uses one of podipc's volume names or mount path. The result is complete: Decide on it says
// SkipAlreadyInjected, so a second pass yields no patch.
func (c Config) Inject(pod *corev1.Pod) error {
	resources, err := c.resources(pod.Annotations)
	if err != nil {
		return err
	}
	channels, err := Channels(pod.Annotations[AnnotationChannels])
	if err != nil {
		return err
	}
	mode, err := c.peerTLS(pod.Annotations)
	if err != nil {
		return err
	}
	procs, err := c.maxProcs(pod.Annotations)
	if err != nil {
		return err
	}
	for _, v := range pod.Spec.Volumes {
		if v.Name == SocketsVolume || v.Name == TokenVolume {
			return fmt.Errorf("the pod already has a volume named %q, which podipc injects", v.Name)
		}
	}
	mount := corev1.VolumeMount{Name: SocketsVolume, MountPath: SocketDir}
	for _, list := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for i := range list {
			for _, m := range list[i].VolumeMounts {
				if m.MountPath == SocketDir {
					return fmt.Errorf("container %q already mounts %s, where podipc mounts its sockets volume", list[i].Name, SocketDir)
				}
			}
			list[i].VolumeMounts = append(list[i].VolumeMounts, mount)
		}
	}
	pod.Spec.Volumes = append(pod.Spec.Volumes, socketsVolume(), tokenVolume(c.Identity != nil))
	// A serviceAccountToken projection needs a named account. The ServiceAccount admission
	// plugin, which runs before webhooks, normally names "default" already; an API server
	// without that plugin would otherwise reject the injected pod.
	if pod.Spec.ServiceAccountName == "" {
		pod.Spec.ServiceAccountName = "default"
	}
	pod.Spec.InitContainers = append([]corev1.Container{c.sidecar(channels, mode, procs, resources)}, pod.Spec.InitContainers...)
	if pod.Labels == nil {
		pod.Labels = map[string]string{}
	}
	pod.Labels[LabelInjected] = "true"
	return nil
}

// Channels parses the podipc.dev/channels annotation into sorted, de-duplicated channel
// names, each a DNS label.
func Channels(annotation string) ([]string, error) {
	var names []string
	for name := range strings.SplitSeq(annotation, ",") {
		name = strings.TrimSpace(name)
		if name == "" {
			continue
		}
		if errs := validation.IsDNS1123Label(name); len(errs) > 0 {
			return nil, fmt.Errorf("annotation %s names channel %q, which is not a valid Channel name: %s",
				AnnotationChannels, name, strings.Join(errs, "; "))
		}
		names = append(names, name)
	}
	slices.Sort(names)
	return slices.Compact(names), nil
}

// resources applies the pod's overrides to the configured sidecar resources.
func (c Config) resources(annotations map[string]string) (corev1.ResourceRequirements, error) {
	r := *c.Resources.DeepCopy()
	for _, o := range []struct {
		annotation string
		list       *corev1.ResourceList
		name       corev1.ResourceName
	}{
		{AnnotationCPURequest, &r.Requests, corev1.ResourceCPU},
		{AnnotationCPULimit, &r.Limits, corev1.ResourceCPU},
		{AnnotationMemoryRequest, &r.Requests, corev1.ResourceMemory},
		{AnnotationMemoryLimit, &r.Limits, corev1.ResourceMemory},
	} {
		value, ok := annotations[o.annotation]
		if !ok {
			continue
		}
		q, err := resource.ParseQuantity(value)
		if err != nil || q.Sign() < 0 {
			return r, fmt.Errorf("annotation %s=%q is not a valid non-negative quantity (for example \"100m\" or \"64Mi\")", o.annotation, value)
		}
		if *o.list == nil {
			*o.list = corev1.ResourceList{}
		}
		(*o.list)[o.name] = q
	}
	return r, nil
}

// sidecar is the podipc-sidecar container: a native sidecar (an init container that keeps
// running) whose startup probe holds the app containers back until the sidecar is ready.
func (c Config) sidecar(channels []string, mode peertls.Mode, procs int, resources corev1.ResourceRequirements) corev1.Container {
	field := func(name, path string) corev1.EnvVar {
		return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{
			FieldRef: &corev1.ObjectFieldSelector{APIVersion: "v1", FieldPath: path},
		}}
	}
	probe := func(path string, period, failures int32) *corev1.Probe {
		return &corev1.Probe{
			ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
				Path: path, Port: intstr.FromString(AdminPortName), Scheme: corev1.URISchemeHTTP,
			}},
			PeriodSeconds:    period,
			FailureThreshold: failures,
			TimeoutSeconds:   1,
			SuccessThreshold: 1,
		}
	}
	return corev1.Container{
		Name:            SidecarName,
		Image:           c.Image,
		ImagePullPolicy: c.PullPolicy,
		Command:         []string{SidecarCommand},
		Args:            []string{"--discovery=kubernetes", "--socket-dir=" + SocketDir},
		RestartPolicy:   ptr.To(corev1.ContainerRestartPolicyAlways),
		Ports: []corev1.ContainerPort{
			{Name: PeerPortName, ContainerPort: PeerPort, Protocol: corev1.ProtocolTCP},
			{Name: AdminPortName, ContainerPort: AdminPort, Protocol: corev1.ProtocolTCP},
		},
		Env:       c.env(channels, mode, procs, field),
		Resources: resources,
		VolumeMounts: []corev1.VolumeMount{
			{Name: SocketsVolume, MountPath: SocketDir},
			{Name: TokenVolume, MountPath: TokenDir, ReadOnly: true},
		},
		// Up to two minutes to become ready once, then readiness. No liveness probe: the
		// kubelet dials the pod IP, so a liveness probe tests the pod network, not the
		// process, and a partition longer than its failures would have the kubelet kill
		// the sidecar and the lines it had not had acknowledged (docs/design.md §6.2).
		// Readiness takes a cut-off pod out of the membership instead.
		StartupProbe:   probe("/readyz", 1, 120),
		ReadinessProbe: probe("/readyz", 5, 3),
		SecurityContext: &corev1.SecurityContext{
			RunAsNonRoot:             ptr.To(true),
			RunAsUser:                ptr.To[int64](sidecarUID),
			RunAsGroup:               ptr.To[int64](sidecarUID),
			ReadOnlyRootFilesystem:   ptr.To(true),
			AllowPrivilegeEscalation: ptr.To(false),
			Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
			SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
		},
		TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
	}
}

// env is the sidecar's environment: the pod from the downward API, its channels, its peer
// TLS mode and GOMAXPROCS (always said, so the sidecar never guesses) and, with identity
// on, where to get its certificate.
func (c Config) env(channels []string, mode peertls.Mode, procs int, field func(name, path string) corev1.EnvVar) []corev1.EnvVar {
	env := []corev1.EnvVar{
		field(EnvPodName, "metadata.name"),
		field(EnvPodNamespace, "metadata.namespace"),
		field(EnvPodUID, "metadata.uid"),
		field(EnvPodIP, "status.podIP"),
		{Name: EnvChannels, Value: strings.Join(channels, ",")},
		{Name: EnvPeerTLS, Value: string(mode)},
		{Name: EnvMaxProcs, Value: strconv.Itoa(procs)},
	}
	// The sidecar sizes its Go soft limit and memory budget from its own memory limit.
	env = append(env, corev1.EnvVar{Name: EnvMemoryLimit, ValueFrom: &corev1.EnvVarSource{
		ResourceFieldRef: &corev1.ResourceFieldSelector{ContainerName: SidecarName, Resource: "limits.memory"},
	}})
	if c.Identity != nil {
		env = append(env,
			corev1.EnvVar{Name: EnvIdentityURL, Value: c.Identity.URL},
			corev1.EnvVar{Name: EnvTrustDomain, Value: c.Identity.TrustDomain},
			corev1.EnvVar{Name: EnvTrustBundle, Value: c.Identity.TrustBundle})
	}
	return env
}

// socketsVolume is the emptyDir holding the node-ipc sockets shared with the app.
func socketsVolume() corev1.Volume {
	return corev1.Volume{Name: SocketsVolume, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}
}

// tokenVolume is the sidecar's own service-account credentials, laid out as client-go's
// in-cluster config expects, so the pod's automountServiceAccountToken stays the user's
// choice and the app containers get no token from podipc. With identity on it also holds
// the identity token: audience podipc.dev/identity (useless against the API server, and
// the API server's token useless at the identity endpoint), ten minutes long.
func tokenVolume(withIdentity bool) corev1.Volume {
	sources := []corev1.VolumeProjection{
		{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token", ExpirationSeconds: ptr.To[int64](3607)}},
		{ConfigMap: &corev1.ConfigMapProjection{
			LocalObjectReference: corev1.LocalObjectReference{Name: "kube-root-ca.crt"},
			Items:                []corev1.KeyToPath{{Key: "ca.crt", Path: "ca.crt"}},
		}},
		{DownwardAPI: &corev1.DownwardAPIProjection{Items: []corev1.DownwardAPIVolumeFile{{
			Path: "namespace", FieldRef: &corev1.ObjectFieldSelector{APIVersion: "v1", FieldPath: "metadata.namespace"},
		}}}},
	}
	if withIdentity {
		sources = append(sources, corev1.VolumeProjection{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{
			Audience: identity.Audience, Path: IdentityTokenPath, ExpirationSeconds: ptr.To[int64](identityTokenSeconds),
		}})
	}
	return corev1.Volume{Name: TokenVolume, VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
		DefaultMode: ptr.To[int32](0o444),
		Sources:     sources,
	}}}
}
