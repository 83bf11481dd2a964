package channel_test

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	authorizationv1 "k8s.io/api/authorization/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/podipc/podipc/internal/testenv"
	"github.com/podipc/podipc/pkg/channel"
)

// TestControllerRole installs the generated ClusterRole of config/rbac/role.yaml for a
// service account and asks the API server (SubjectAccessReview) what that account may do
// in a namespace it has never seen: bind the member role, and write no Role, ClusterRole
// or binding of any other role.
func TestControllerRole(t *testing.T) {
	f, err := os.Open(filepath.Join(testenv.RepoRoot(), "config", "rbac", "role.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	var role rbacv1.ClusterRole
	dec := utilyaml.NewYAMLOrJSONDecoder(f, 4096)
	for role.Kind != "ClusterRole" {
		if err := dec.Decode(&role); errors.Is(err, io.EOF) {
			t.Fatal("config/rbac/role.yaml has no ClusterRole")
		} else if err != nil {
			t.Fatal(err)
		}
	}
	role.ObjectMeta = metav1.ObjectMeta{Name: "rbac-test-controller"}
	if err := env.Client.Create(t.Context(), &role); err != nil {
		t.Fatal(err)
	}
	user := "system:serviceaccount:podipc-system:rbac-test-controller"
	if err := env.Client.Create(t.Context(), &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "rbac-test-controller"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role.Name},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.UserKind, APIGroup: rbacv1.GroupName, Name: user}},
	}); err != nil {
		t.Fatal(err)
	}
	ns := newNamespace(t)
	cases := map[string]struct {
		attrs authorizationv1.ResourceAttributes
		allow bool
	}{
		"create a RoleBinding":        {authorizationv1.ResourceAttributes{Namespace: ns, Verb: "create", Group: "rbac.authorization.k8s.io", Resource: "rolebindings"}, true},
		"bind the member role":        {authorizationv1.ResourceAttributes{Namespace: ns, Verb: "bind", Group: "rbac.authorization.k8s.io", Resource: "clusterroles", Name: channel.MemberRole}, true},
		"bind cluster-admin":          {authorizationv1.ResourceAttributes{Namespace: ns, Verb: "bind", Group: "rbac.authorization.k8s.io", Resource: "clusterroles", Name: "cluster-admin"}, false},
		"escalate":                    {authorizationv1.ResourceAttributes{Namespace: ns, Verb: "escalate", Group: "rbac.authorization.k8s.io", Resource: "roles"}, false},
		"create a Role":               {authorizationv1.ResourceAttributes{Namespace: ns, Verb: "create", Group: "rbac.authorization.k8s.io", Resource: "roles"}, false},
		"update a Role":               {authorizationv1.ResourceAttributes{Namespace: ns, Verb: "update", Group: "rbac.authorization.k8s.io", Resource: "roles", Name: "x"}, false},
		"create a ClusterRole":        {authorizationv1.ResourceAttributes{Verb: "create", Group: "rbac.authorization.k8s.io", Resource: "clusterroles"}, false},
		"create a ClusterRoleBinding": {authorizationv1.ResourceAttributes{Verb: "create", Group: "rbac.authorization.k8s.io", Resource: "clusterrolebindings"}, false},
		"read a Secret elsewhere":     {authorizationv1.ResourceAttributes{Namespace: ns, Verb: "get", Resource: "secrets", Name: "x"}, false},
		"write a pod":                 {authorizationv1.ResourceAttributes{Namespace: ns, Verb: "update", Resource: "pods", Name: "x"}, false},
		"review a token":              {authorizationv1.ResourceAttributes{Verb: "create", Group: "authentication.k8s.io", Resource: "tokenreviews"}, true},
		"bind the slice writer":       {authorizationv1.ResourceAttributes{Namespace: ns, Verb: "bind", Group: "rbac.authorization.k8s.io", Resource: "clusterroles", Name: channel.SliceWriterRole}, true},
		"read EndpointSlices":         {authorizationv1.ResourceAttributes{Verb: "list", Group: "discovery.k8s.io", Resource: "endpointslices"}, true},
		// EndpointSlices are written only where the controller bound the slice writer to
		// itself (TestControllerWritesSlicesOnlyWhereChannelsAre): not in a namespace
		// without a Channel, and never cluster-wide (below).
		"create an EndpointSlice": {authorizationv1.ResourceAttributes{Namespace: ns, Verb: "create", Group: "discovery.k8s.io", Resource: "endpointslices"}, false},
		"update an EndpointSlice": {authorizationv1.ResourceAttributes{Namespace: ns, Verb: "update", Group: "discovery.k8s.io", Resource: "endpointslices", Name: "x"}, false},
		"patch an EndpointSlice":  {authorizationv1.ResourceAttributes{Namespace: ns, Verb: "patch", Group: "discovery.k8s.io", Resource: "endpointslices", Name: "x"}, false},
		"delete an EndpointSlice": {authorizationv1.ResourceAttributes{Namespace: ns, Verb: "delete", Group: "discovery.k8s.io", Resource: "endpointslices", Name: "x"}, false},
		"delete a ClusterRole":    {authorizationv1.ResourceAttributes{Verb: "delete", Group: "rbac.authorization.k8s.io", Resource: "clusterroles", Name: channel.MemberRole}, false},
		"patch a ClusterRole":     {authorizationv1.ResourceAttributes{Verb: "patch", Group: "rbac.authorization.k8s.io", Resource: "clusterroles", Name: channel.SliceWriterRole}, false},
		"delete a Role":           {authorizationv1.ResourceAttributes{Namespace: ns, Verb: "delete", Group: "rbac.authorization.k8s.io", Resource: "roles", Name: "x"}, false},
	}
	// No cluster-wide write on Roles, ClusterRoles or EndpointSlices, verb by verb.
	for _, res := range []struct{ group, resource string }{
		{"rbac.authorization.k8s.io", "roles"}, {"rbac.authorization.k8s.io", "clusterroles"}, {"discovery.k8s.io", "endpointslices"},
	} {
		for _, verb := range []string{"create", "update", "patch", "delete", "deletecollection"} {
			cases[verb+" "+res.resource+" cluster-wide"] = struct {
				attrs authorizationv1.ResourceAttributes
				allow bool
			}{authorizationv1.ResourceAttributes{Verb: verb, Group: res.group, Resource: res.resource}, false}
		}
	}
	allowed := func(attrs authorizationv1.ResourceAttributes) (bool, error) {
		sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{User: user, ResourceAttributes: &attrs}}
		err := env.Client.Create(t.Context(), sar)
		return sar.Status.Allowed, err
	}
	// Until the API server's RBAC cache has the new role every answer is "no", which would
	// pass the denials for the wrong reason: wait for an allowed one first.
	testenv.Eventually(t, "the RBAC cache sees the role", func() error {
		if ok, err := allowed(cases["bind the member role"].attrs); err != nil || !ok {
			return errors.Join(errors.New("not allowed yet"), err)
		}
		return nil
	})
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			ok, err := allowed(tc.attrs)
			if err != nil {
				t.Fatal(err)
			}
			if ok != tc.allow {
				t.Fatalf("allowed = %v, want %v", ok, tc.allow)
			}
		})
	}
}

// TestControllerWritesSlicesOnlyWhereChannelsAre asks the API server what the suite's
// controller (running with config/rbac's rights only) may do once it has published a
// Channel: write EndpointSlices in that Channel's namespace, through its own RoleBinding of
// the slice writer, and still nowhere else.
func TestControllerWritesSlicesOnlyWhereChannelsAre(t *testing.T) {
	ns, elsewhere := newNamespace(t), newNamespace(t)
	ch := newChannel(t, ns, "orders")
	user := "system:serviceaccount:" + controllerNS + ":" + controllerSA
	allowed := func(ns string) (bool, error) {
		sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{User: user, ResourceAttributes: &authorizationv1.ResourceAttributes{
			Namespace: ns, Verb: "create", Group: "discovery.k8s.io", Resource: "endpointslices",
		}}}
		err := env.Client.Create(t.Context(), sar)
		return sar.Status.Allowed, err
	}
	testenv.Eventually(t, "the controller may write slices in the Channel's namespace", func() error {
		if ok, err := allowed(ns); err != nil || !ok {
			return errors.Join(errors.New("not allowed yet"), err)
		}
		return nil
	})
	binding := &rbacv1.RoleBinding{}
	if err := env.Client.Get(t.Context(), client.ObjectKey{Namespace: ns, Name: channel.SliceWriterName(ch.Name)}, binding); err != nil {
		t.Fatal(err)
	}
	if binding.RoleRef.Name != channel.SliceWriterRole || !metav1.IsControlledBy(binding, ch) {
		t.Errorf("binding %s: roleRef %v, owners %v; want %s, owned by the Channel", binding.Name, binding.RoleRef, binding.OwnerReferences, channel.SliceWriterRole)
	}
	for _, other := range []string{elsewhere, ""} {
		if ok, err := allowed(other); err != nil || ok {
			t.Errorf("the controller may create EndpointSlices in namespace %q (err %v): only where a Channel is", other, err)
		}
	}
}
