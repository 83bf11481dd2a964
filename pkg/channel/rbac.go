package channel

import (
	"context"

	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
)

// MemberRole is the fixed ClusterRole of member sidecars, installed with the controller
// (the chart, config/rbac/member_role.yaml). The controller only binds it, per channel and
// namespace, and never writes a Role: a compromised controller cannot mint new rights.
const MemberRole = "podipc-member"

// MemberRules are MemberRole's rules: read Channels and EndpointSlices, nothing more. A
// fixed role cannot name a channel, so a member reads every Channel of its namespace
// (specs only; nothing secret) and, as before, every EndpointSlice (RBAC cannot narrow by
// label). test/chart and this package's tests hold the chart and config/rbac to these.
func MemberRules() []rbacv1.PolicyRule {
	return []rbacv1.PolicyRule{
		{
			APIGroups: []string{podipcv1alpha1.GroupVersion.Group},
			Resources: []string{"channels"},
			Verbs:     []string{"get", "list", "watch"},
		},
		{
			APIGroups: []string{"discovery.k8s.io"},
			Resources: []string{"endpointslices"},
			Verbs:     []string{"get", "list", "watch"},
		},
	}
}

// SliceWriterRole is the fixed ClusterRole that lets the controller write EndpointSlices.
// The controller holds only read on EndpointSlices cluster-wide, and binds this role to
// itself with one RoleBinding per Channel in the Channel's namespace (SliceWriterName),
// owned by the Channel, so it writes slices only where a Channel is (docs/security.md,
// "What the controller may do").
const SliceWriterRole = "podipc-slice-writer"

// SliceWriterRules are SliceWriterRole's rules (config/rbac/slice_writer_role.yaml and the
// chart are held to them by tests).
func SliceWriterRules() []rbacv1.PolicyRule {
	return []rbacv1.PolicyRule{{
		APIGroups: []string{"discovery.k8s.io"},
		Resources: []string{"endpointslices"},
		Verbs:     []string{"create", "update", "patch", "delete"},
	}}
}

// SliceWriterName names the controller's own RoleBinding of SliceWriterRole for a channel.
// The colon cannot occur in a Channel's name, so it never meets an AccessName.
func SliceWriterName(channel string) string { return "podipc-slice-writer:" + channel }

// AccessName names the RoleBinding that gives a channel's members read access.
func AccessName(channel string) string { return "podipc-" + channel }

// applyRBAC makes the channel's RoleBinding of MemberRole to the members' service accounts
// match the scope. A binding left by an older release that referred to a per-channel Role
// is replaced (roleRef is immutable); that Role is no longer used and goes with its Channel.
func (r *Reconciler) applyRBAC(ctx context.Context, s *scope) error {
	binding := &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: AccessName(s.channel.Name), Namespace: s.channel.Namespace}}
	want := rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: MemberRole}
	existing := &rbacv1.RoleBinding{}
	err := r.Client.Get(ctx, client.ObjectKeyFromObject(binding), existing)
	if err == nil && existing.RoleRef != want {
		if err := r.Client.Delete(ctx, existing, client.Preconditions{UID: &existing.UID}); err != nil && !apierrors.IsNotFound(err) {
			return err
		}
	} else if err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	_, err = controllerutil.CreateOrUpdate(ctx, r.Client, binding, func() error {
		setOwned(&binding.ObjectMeta, s)
		binding.RoleRef = want
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

// applySliceWriter binds SliceWriterRole to the controller itself (Reconciler.Self) in the
// channel's namespace. It reports whether the binding was just created: the API server's
// authorizer may not see it for a moment, so a slice write refused then is retried.
func (r *Reconciler) applySliceWriter(ctx context.Context, s *scope) (created bool, _ error) {
	if r.Self == nil {
		return false, nil
	}
	binding := &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: SliceWriterName(s.channel.Name), Namespace: s.channel.Namespace}}
	op, err := controllerutil.CreateOrUpdate(ctx, r.Client, binding, func() error {
		setOwned(&binding.ObjectMeta, s)
		binding.RoleRef = rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: SliceWriterRole}
		binding.Subjects = []rbacv1.Subject{*r.Self}
		return nil
	})
	return op == controllerutil.OperationResultCreated, err
}

// setOwned labels an object with its channel and makes the Channel its controller owner.
func setOwned(m *metav1.ObjectMeta, s *scope) {
	if m.Labels == nil {
		m.Labels = map[string]string{}
	}
	m.Labels[podipcv1alpha1.ChannelLabel] = s.channel.Name
	m.OwnerReferences = []metav1.OwnerReference{s.owner}
}
