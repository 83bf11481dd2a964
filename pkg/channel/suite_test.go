package channel_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/rand"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/internal/testenv"
	"github.com/podipc/podipc/pkg/channel"
	"github.com/podipc/podipc/pkg/seal"
)

var (
	env *testenv.Env
	// writes counts the controller's API writes (creates, updates, patches, deletes,
	// status patches), for the scale benchmark.
	writes atomic.Int64
	// sealKey is the controller's seal key: sidecarPod seals pods with it, as the webhook.
	sealKey = mustKey()
)

func mustKey() *seal.Key {
	k, err := seal.NewKey([]byte("a test key of thirty-two bytes.."))
	if err != nil {
		panic(err)
	}
	return k
}

func TestMain(m *testing.M) { testenv.Main(m, &env, startController) }

// The controller's service account: the suite's controller runs as it, with the rights of
// config/rbac only.
const (
	controllerNS = "podipc-system"
	controllerSA = "podipc-controller"
)

// startController runs the controller as cmd/podipc-controller does (same cache
// restrictions, same RBAC: the generated config/rbac roles bound to its service account,
// which it impersonates), once for the whole package, with its client wrapped to count
// writes.
func startController(e *testenv.Env) (func(), error) {
	ctrl.SetLogger(logr.Discard()) // the tests assert outcomes; controller logs are noise here
	if err := installControllerRBAC(e); err != nil {
		return nil, fmt.Errorf("installing config/rbac: %w", err)
	}
	self := &rbacv1.Subject{Kind: rbacv1.ServiceAccountKind, Namespace: controllerNS, Name: controllerSA}
	return e.StartManagerAs(e.As(controllerNS, controllerSA), ctrl.Options{
		Cache:      cache.Options{ByObject: channel.CacheByObject()},
		Controller: config.Controller{SkipNameValidation: ptrTo(true)},
	}, func(ctx context.Context, mgr ctrl.Manager) error {
		r := &channel.Reconciler{Client: countingClient{mgr.GetClient()}, Recorder: mgr.GetEventRecorder("podipc-controller"), Seal: sealKey, Self: self}
		return r.SetupWithManager(ctx, mgr, 4)
	})
}

// installControllerRBAC creates the roles of config/rbac (role.yaml, generated from the
// markers, and the fixed member and slice-writer ClusterRoles) and binds them to the
// controller's service account as the chart does, then waits until the API server's
// authorizer applies them.
func installControllerRBAC(e *testenv.Env) error {
	ctx := context.Background()
	for _, o := range []client.Object{
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: controllerNS}},
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: controllerNS, Name: controllerSA}},
	} {
		if err := e.Client.Create(ctx, o); err != nil {
			return err
		}
	}
	subjects := []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: controllerNS, Name: controllerSA}}
	for _, file := range []string{"role.yaml", "member_role.yaml", "slice_writer_role.yaml"} {
		f, err := os.Open(filepath.Join(testenv.RepoRoot(), "config", "rbac", file))
		if err != nil {
			return err
		}
		dec := utilyaml.NewYAMLOrJSONDecoder(f, 4096)
		for {
			var role rbacv1.ClusterRole // a Role decodes the same way
			if err := dec.Decode(&role); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				_ = f.Close()
				return fmt.Errorf("%s: %w", file, err)
			}
			objs := []client.Object{&role}
			ref := rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: role.Kind, Name: role.Name}
			switch {
			case role.Kind == "Role":
				objs = []client.Object{
					&rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: role.Name, Namespace: role.Namespace}, Rules: role.Rules},
					&rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: role.Name, Namespace: role.Namespace}, RoleRef: ref, Subjects: subjects},
				}
			case role.Name == "podipc-controller":
				objs = append(objs, &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: role.Name}, RoleRef: ref, Subjects: subjects})
			}
			for _, o := range objs {
				if err := e.Client.Create(ctx, o); err != nil {
					_ = f.Close()
					return fmt.Errorf("%s: %w", file, err)
				}
			}
		}
		_ = f.Close()
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
			User:               "system:serviceaccount:" + controllerNS + ":" + controllerSA,
			ResourceAttributes: &authorizationv1.ResourceAttributes{Verb: "list", Resource: "pods"},
		}}
		if err := e.Client.Create(ctx, sar); err != nil {
			return err
		}
		if sar.Status.Allowed {
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New("the API server's authorizer never applied the controller's ClusterRoleBinding")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func ptrTo[T any](v T) *T { return &v }

// newNamespace creates a namespace for one test.
func newNamespace(t testing.TB) string {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "t-" + rand.String(8)}}
	if err := env.Client.Create(context.Background(), ns); err != nil {
		t.Fatalf("creating namespace: %v", err)
	}
	return ns.Name
}

func newChannel(t testing.TB, ns, name string) *podipcv1alpha1.Channel {
	t.Helper()
	ch := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	if err := env.Client.Create(context.Background(), ch); err != nil {
		t.Fatalf("creating Channel %s: %v", name, err)
	}
	return ch
}

// sidecarPod returns a pod as the webhook leaves it: labelled injected and sealed, with
// the sidecar as a native sidecar naming channels in PODIPC_CHANNELS.
func sidecarPod(ns, name, serviceAccount, channels string) *corev1.Pod {
	sa := serviceAccount
	if sa == "" {
		sa = "default"
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: ns, Name: name,
			Labels:      map[string]string{podipcv1alpha1.InjectedLabel: "true"},
			Annotations: map[string]string{seal.Annotation: sealKey.Sign(ns, sa, channels)},
		},
		Spec: corev1.PodSpec{
			ServiceAccountName: serviceAccount,
			InitContainers: []corev1.Container{{
				Name:          podipcv1alpha1.SidecarContainerName,
				Image:         "podipc-sidecar:test",
				RestartPolicy: ptrTo(corev1.ContainerRestartPolicyAlways),
				Env:           []corev1.EnvVar{{Name: podipcv1alpha1.ChannelsEnv, Value: channels}},
			}},
			Containers: []corev1.Container{{Name: "app", Image: "app:test"}},
		},
	}
}

// createPod creates a pod and, if ip is set, gives it that IP and readiness through the
// status subresource, as a kubelet would (envtest has none).
func createPod(t testing.TB, pod *corev1.Pod, ip string, ready bool) *corev1.Pod {
	t.Helper()
	if err := env.Client.Create(context.Background(), pod); err != nil {
		t.Fatalf("creating pod %s: %v", pod.Name, err)
	}
	if ip != "" {
		setPodStatus(t, pod, ip, ready)
	}
	return pod
}

func setPodStatus(t testing.TB, pod *corev1.Pod, ip string, ready bool) {
	t.Helper()
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	pod.Status.Phase = corev1.PodRunning
	pod.Status.PodIP = ip
	pod.Status.PodIPs = []corev1.PodIP{{IP: ip}}
	pod.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: status, LastTransitionTime: metav1.Now()}}
	if err := env.Client.Status().Update(context.Background(), pod); err != nil {
		t.Fatalf("setting the status of pod %s: %v", pod.Name, err)
	}
}

// slicesOf lists a channel's EndpointSlices straight from the API server.
func slicesOf(t testing.TB, ns, name string) []discoveryv1.EndpointSlice {
	t.Helper()
	list := &discoveryv1.EndpointSliceList{}
	if err := env.Client.List(context.Background(), list, client.InNamespace(ns), client.MatchingLabels{podipcv1alpha1.ChannelLabel: name}); err != nil {
		t.Fatalf("listing slices: %v", err)
	}
	return list.Items
}

// endpointsByPod flattens slices into pod name → endpoint, failing on a pod listed twice.
func endpointsByPod(slices []discoveryv1.EndpointSlice) (map[string]discoveryv1.Endpoint, error) {
	out := map[string]discoveryv1.Endpoint{}
	for _, s := range slices {
		for _, ep := range s.Endpoints {
			if _, dup := out[ep.TargetRef.Name]; dup {
				return nil, fmt.Errorf("pod %s is in more than one slice", ep.TargetRef.Name)
			}
			out[ep.TargetRef.Name] = ep
		}
	}
	return out, nil
}

// countingClient counts the writes of the client it wraps.
type countingClient struct{ client.Client }

func (c countingClient) Create(ctx context.Context, o client.Object, opts ...client.CreateOption) error {
	writes.Add(1)
	return c.Client.Create(ctx, o, opts...)
}

func (c countingClient) Update(ctx context.Context, o client.Object, opts ...client.UpdateOption) error {
	writes.Add(1)
	return c.Client.Update(ctx, o, opts...)
}

func (c countingClient) Patch(ctx context.Context, o client.Object, p client.Patch, opts ...client.PatchOption) error {
	writes.Add(1)
	return c.Client.Patch(ctx, o, p, opts...)
}

func (c countingClient) Delete(ctx context.Context, o client.Object, opts ...client.DeleteOption) error {
	writes.Add(1)
	return c.Client.Delete(ctx, o, opts...)
}

func (c countingClient) Status() client.SubResourceWriter { return countingStatus{c.Client.Status()} }

type countingStatus struct{ client.SubResourceWriter }

func (c countingStatus) Update(ctx context.Context, o client.Object, opts ...client.SubResourceUpdateOption) error {
	writes.Add(1)
	return c.SubResourceWriter.Update(ctx, o, opts...)
}

func (c countingStatus) Patch(ctx context.Context, o client.Object, p client.Patch, opts ...client.SubResourcePatchOption) error {
	writes.Add(1)
	return c.SubResourceWriter.Patch(ctx, o, p, opts...)
}
