package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/podipc/podipc/internal/testenv"
)

// cluster is the running control plane: kube-apiserver and etcd, started by envtest (as a
// launcher only) with podipc's CRDs installed.
type cluster struct {
	env *testenv.Env
	// admin is the path of a cluster-admin kubeconfig, for kubectl inside the namespace.
	admin string
	// userKubeconfig is the same for the user's kubectl, outside the namespace.
	userKubeconfig string
	// kubectl is the path of the kubectl binary built with the control plane.
	kubectl string
}

// startCluster starts the control plane from the binaries in assets, advertising nodeIP,
// and writes the admin
// kubeconfigs into dir: one for inside the namespace, one reaching the API server through
// hostAPI from outside.
func startCluster(assets, dir, nodeIP, hostAPI string) (*cluster, error) {
	// testenv looks the binaries up in $KUBEBUILDER_ASSETS first.
	if err := os.Setenv("KUBEBUILDER_ASSETS", assets); err != nil {
		return nil, err
	}
	logs, err := os.Create(filepath.Join(dir, "control-plane.log"))
	if err != nil {
		return nil, err
	}
	defer func() { _ = logs.Close() }() // the processes hold their own descriptors
	env, err := testenv.Start(func(e *envtest.Environment) {
		e.ControlPlane.APIServer.Out, e.ControlPlane.APIServer.Err = logs, logs
		// The namespace has no default route to pick an address from.
		e.ControlPlane.APIServer.Configure().Set("advertise-address", nodeIP)
		e.ControlPlane.Etcd = &envtest.Etcd{Out: logs, Err: logs}
	})
	if err != nil {
		return nil, err
	}
	c := &cluster{
		env: env, kubectl: filepath.Join(assets, "kubectl"),
		admin: filepath.Join(dir, "admin.kubeconfig"), userKubeconfig: filepath.Join(dir, "kubeconfig"),
	}
	if err := c.writeAdminKubeconfigs(hostAPI); err != nil {
		return nil, errors.Join(fmt.Errorf("writing the admin kubeconfig: %w", err), env.Stop())
	}
	return c, nil
}

// writeAdminKubeconfigs writes the kubeconfigs of a cluster admin: c.admin, and
// c.userKubeconfig with the server address replaced by hostAPI. The API server's
// certificate is valid for 127.0.0.1 on any port.
func (c *cluster) writeAdminKubeconfigs(hostAPI string) error {
	user, err := c.env.Environment.ControlPlane.AddUser(envtest.User{Name: "podipc-demo-admin", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		return err
	}
	b, err := user.KubeConfig()
	if err != nil {
		return err
	}
	if err := os.WriteFile(c.admin, b, 0o600); err != nil {
		return err
	}
	kc, err := clientcmd.Load(b)
	if err != nil {
		return err
	}
	for _, cl := range kc.Clusters {
		cl.Server = "https://" + hostAPI
	}
	return clientcmd.WriteToFile(*kc, c.userKubeconfig)
}

// stop stops the API server and etcd and removes their files.
func (c *cluster) stop() error { return c.env.Stop() }

// client is an admin client.
func (c *cluster) client() client.Client { return c.env.Client }

// serviceAccountKubeconfig creates the service account (if needed), requests a token for it
// as the kubelet does for a projected token volume (bound to pod, if not nil), and writes a
// kubeconfig with that token to path. Whoever uses it has the account's permissions and no
// more, so the controller's RBAC is exercised as in a cluster.
func (c *cluster) serviceAccountKubeconfig(ctx context.Context, namespace, name string, pod *corev1.Pod, path string) error {
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name}}
	if err := client.IgnoreAlreadyExists(c.client().Create(ctx, sa)); err != nil {
		return err
	}
	tr := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: ptr.To[int64](24 * 3600)}}
	if pod != nil {
		tr.Spec.BoundObjectRef = &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
	}
	if err := c.client().SubResource("token").Create(ctx, sa, tr); err != nil {
		return fmt.Errorf("requesting a token for service account %s/%s: %w", namespace, name, err)
	}
	return writeKubeconfig(path, c.env.Config, "system:serviceaccount:"+namespace+":"+name, tr.Status.Token)
}

// writeKubeconfig writes a kubeconfig reaching cfg's API server with a bearer token.
func writeKubeconfig(path string, cfg *rest.Config, user, token string) error {
	kc := clientcmdapi.NewConfig()
	kc.Clusters["podipc-demo"] = &clientcmdapi.Cluster{Server: cfg.Host, CertificateAuthorityData: cfg.CAData}
	kc.AuthInfos[user] = &clientcmdapi.AuthInfo{Token: token}
	kc.Contexts["podipc-demo"] = &clientcmdapi.Context{Cluster: "podipc-demo", AuthInfo: user}
	kc.CurrentContext = "podipc-demo"
	return clientcmd.WriteToFile(*kc, path)
}

// applyFile creates every object of a YAML file (documents separated by "---"), in
// namespace if it is not empty, after edit (if any) has adjusted it.
func (c *cluster) applyFile(ctx context.Context, path, namespace string, edit func(*unstructured.Unstructured) error) ([]*unstructured.Unstructured, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	dec := utilyaml.NewYAMLOrJSONDecoder(f, 4096)
	var objs []*unstructured.Unstructured
	for {
		obj := &unstructured.Unstructured{}
		if err := dec.Decode(&obj.Object); errors.Is(err, io.EOF) {
			return objs, nil
		} else if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		if len(obj.Object) == 0 {
			continue // a document of comments only
		}
		if namespace != "" {
			obj.SetNamespace(namespace)
		}
		if edit != nil {
			if err := edit(obj); err != nil {
				return nil, err
			}
		}
		if err := c.client().Create(ctx, obj); err != nil {
			return nil, fmt.Errorf("creating %s %s from %s: %w", obj.GetKind(), obj.GetName(), path, err)
		}
		objs = append(objs, obj)
	}
}

// kubectlOutput runs the built kubectl against the cluster as the admin.
func (c *cluster) kubectlOutput(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, c.kubectl, append([]string{"--kubeconfig", c.admin}, args...)...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}
