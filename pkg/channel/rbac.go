package channel

import (
	"context"

	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
)

// AccessName names the Role and RoleBinding that give a channel's members read access.
func AccessName(channel string) string { return "podipc-" + channel }

// applyRBAC makes the channel's Role (read this Channel, read EndpointSlices) and its
// RoleBinding to the members' service accounts match the scope. Nothing more is granted:
// the sidecar needs to read its channels and their members, never to write. Channels are
// granted by name; the sidecar watches each with a metadata.name field selector, which
// RBAC authorizes through resourceNames. EndpointSlices cannot be narrowed by label in
// RBAC, so the members can read every EndpointSlice of the namespace.
func (r *Reconciler) applyRBAC(ctx context.Context, s *scope) error {
	meta := func() metav1.ObjectMeta {
		return metav1.ObjectMeta{Name: AccessName(s.channel.Name), Namespace: s.channel.Namespace}
	}
	role := &rbacv1.Role{ObjectMeta: meta()}
	if _, err := controllerutil.CreateOrUpdate(ctx, r.Client, role, func() error {
		setOwned(&role.ObjectMeta, s)
		role.Rules = []rbacv1.PolicyRule{
			{
				APIGroups:     []string{podipcv1alpha1.GroupVersion.Group},
				Resources:     []string{"channels"},
				ResourceNames: []string{s.channel.Name},
				Verbs:         []string{"get", "list", "watch"},
			},
			{
				APIGroups: []string{"discovery.k8s.io"},
				Resources: []string{"endpointslices"},
				Verbs:     []string{"get", "list", "watch"},
			},
		}
		return nil
	}); err != nil {
		return err
	}

	binding := &rbacv1.RoleBinding{ObjectMeta: meta()}
	_, err := controllerutil.CreateOrUpdate(ctx, r.Client, binding, func() error {
		setOwned(&binding.ObjectMeta, s)
		binding.RoleRef = rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: role.Name}
		binding.Subjects = nil
		for _, sa := range s.accounts {
			binding.Subjects = append(binding.Subjects, rbacv1.Subject{
				Kind: rbacv1.ServiceAccountKind, Name: sa, Namespace: s.channel.Namespace,
			})
		}
		return nil
	})
	return err
}

// setOwned labels an object with its channel and makes the Channel its controller owner.
func setOwned(m *metav1.ObjectMeta, s *scope) {
	if m.Labels == nil {
		m.Labels = map[string]string{}
	}
	m.Labels[podipcv1alpha1.ChannelLabel] = s.channel.Name
	m.OwnerReferences = []metav1.OwnerReference{s.owner}
}
