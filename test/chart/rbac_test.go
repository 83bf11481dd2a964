package chart_test

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	"github.com/podipc/podipc/pkg/channel"
)

// narrowed are the resources the chart deliberately grants more narrowly than the markers
// can say: by name, or in the release namespace only. The controller touches only its own.
var narrowed = map[string]string{
	"leases":                        "leader election uses one Lease, in the release namespace: a Role, not the ClusterRole",
	"secrets":                       "only podipc-webhook-tls and podipc-identity, in the release namespace (create cannot be narrowed by name)",
	"configmaps":                    "only podipc-identity-trust, in the release namespace (create cannot be narrowed by name)",
	"mutatingwebhookconfigurations": "only podipc-injector, by resourceNames",
}

// TestRBACCoversGeneratedRole: every permission the +kubebuilder:rbac markers ask for
// (config/rbac/role.yaml, generated) is granted by the chart, so the controller never
// fails on a Forbidden the markers predicted.
func TestRBACCoversGeneratedRole(t *testing.T) {
	objs := render(t, nil)
	chartRole := into[rbacv1.ClusterRole](t, objs.get(t, "ClusterRole", "podipc-controller"))
	nsRole := into[rbacv1.Role](t, objs.get(t, "Role", "podipc-controller"))

	f, err := os.Open(filepath.Join(repoRoot, "config", "rbac", "role.yaml"))
	if err != nil {
		t.Fatalf("the generated role is missing (run 'make generate'): %v", err)
	}
	defer func() { _ = f.Close() }()
	dec := utilyaml.NewYAMLOrJSONDecoder(f, 4096)
	checked := 0
	for {
		var r rbacv1.ClusterRole // a Role decodes the same way
		if err := dec.Decode(&r); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			t.Fatal(err)
		}
		granted := chartRole.Rules
		if r.Kind == "Role" {
			granted = append(slices.Clone(nsRole.Rules), chartRole.Rules...)
		}
		for _, rule := range r.Rules {
			for _, g := range rule.APIGroups {
				for _, res := range rule.Resources {
					for _, v := range rule.Verbs {
						checked++
						if _, ok := narrowed[res]; ok {
							// Granted in some form, by name or in the release namespace.
							if !allowsSome(append(slices.Clone(nsRole.Rules), chartRole.Rules...), g, res, v) {
								t.Errorf("the chart does not grant %s %q in group %q at all (generated %s %s asks for it)", v, res, g, r.Kind, r.Name)
							}
							continue
						}
						if !allows(granted, g, res, v, rule.ResourceNames) {
							t.Errorf("the chart does not grant %s %q in group %q (generated %s %s asks for it)", v, res, g, r.Kind, r.Name)
						}
					}
				}
			}
		}
	}
	if checked == 0 {
		t.Fatal("config/rbac/role.yaml grants nothing; the comparison checked nothing")
	}
}

// allows reports whether rules grant verb on group/resource, for every name in names (or
// for any name, when names is empty).
func allows(rules []rbacv1.PolicyRule, group, resource, verb string, names []string) bool {
	return slices.ContainsFunc(rules, func(r rbacv1.PolicyRule) bool {
		if !slices.Contains(r.APIGroups, group) || !slices.Contains(r.Resources, resource) || !slices.Contains(r.Verbs, verb) {
			return false
		}
		if len(r.ResourceNames) == 0 {
			return true
		}
		return len(names) > 0 && !slices.ContainsFunc(names, func(n string) bool { return !slices.Contains(r.ResourceNames, n) })
	})
}

func allowsSome(rules []rbacv1.PolicyRule, group, resource, verb string) bool {
	return slices.ContainsFunc(rules, func(r rbacv1.PolicyRule) bool {
		return slices.Contains(r.APIGroups, group) && slices.Contains(r.Resources, resource) && slices.Contains(r.Verbs, verb)
	})
}

// TestRBACLeastPrivilege: what the chart must never grant.
func TestRBACLeastPrivilege(t *testing.T) {
	for name, values := range valueSets {
		t.Run(name, func(t *testing.T) {
			objs := render(t, values)
			var rules []rbacv1.PolicyRule
			for _, u := range append(objs.kinds("ClusterRole"), objs.kinds("Role")...) {
				if u.GetAnnotations()["helm.sh/hook"] == "test" {
					continue
				}
				rules = append(rules, into[rbacv1.Role](t, u).Rules...)
			}
			for _, r := range rules {
				all := strings.Join(append(append(slices.Clone(r.APIGroups), r.Resources...), r.Verbs...), " ")
				for _, bad := range []string{"*", "escalate", "bind", "impersonate"} {
					if bad == "bind" && slices.Equal(r.Resources, []string{"clusterroles"}) && slices.Equal(r.ResourceNames, []string{channel.MemberRole, channel.SliceWriterRole}) {
						continue // binding the fixed member and slice-writer roles, and nothing else
					}
					if slices.Contains(r.Verbs, bad) || slices.Contains(r.Resources, bad) || slices.Contains(r.APIGroups, bad) {
						t.Errorf("rule %q grants %q", all, bad)
					}
				}
				if slices.ContainsFunc(r.Resources, func(res string) bool { return res == "roles" || res == "clusterroles" }) &&
					slices.ContainsFunc(r.Verbs, func(v string) bool { return v != "get" && v != "list" && v != "watch" && v != "bind" }) {
					t.Errorf("rule %q lets the controller write roles", all)
				}
				for _, named := range []string{"secrets", "configmaps", "mutatingwebhookconfigurations"} {
					// create cannot be narrowed by name; it reads nothing, so it is the exception.
					if slices.Contains(r.Resources, named) && len(r.ResourceNames) == 0 && !slices.Equal(r.Verbs, []string{"create"}) {
						t.Errorf("rule %q grants %s without resourceNames", all, named)
					}
				}
				if slices.Contains(r.Resources, "pods") && slices.ContainsFunc(r.Verbs, func(v string) bool { return v != "get" && v != "list" && v != "watch" }) {
					t.Errorf("rule %q lets the controller write pods", all)
				}
			}
		})
	}
}

// TestMemberRole: the chart's podipc-member ClusterRole and config/rbac/member_role.yaml
// grant exactly pkg/channel's MemberRules, which are read-only.
func TestMemberRole(t *testing.T) {
	chartRole := into[rbacv1.ClusterRole](t, render(t, nil).get(t, "ClusterRole", channel.MemberRole))
	raw, err := os.ReadFile(filepath.Join(repoRoot, "config", "rbac", "member_role.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var configRole rbacv1.ClusterRole
	if err := utilyaml.Unmarshal(raw, &configRole); err != nil {
		t.Fatal(err)
	}
	want := channel.MemberRules()
	for name, got := range map[string][]rbacv1.PolicyRule{"the chart's": chartRole.Rules, "config/rbac's": configRole.Rules} {
		if !equality.Semantic.DeepEqual(got, want) {
			t.Errorf("%s %s grants %+v, want %+v", name, channel.MemberRole, got, want)
		}
	}
	for _, r := range want {
		if !slices.Equal(r.Verbs, []string{"get", "list", "watch"}) {
			t.Errorf("members may %v %v: they must only read", r.Verbs, r.Resources)
		}
	}
}

// TestSliceWriterRole: the chart's podipc-slice-writer ClusterRole and
// config/rbac/slice_writer_role.yaml grant exactly pkg/channel's SliceWriterRules, and the
// controller's ClusterRole writes no EndpointSlice itself.
func TestSliceWriterRole(t *testing.T) {
	objs := render(t, nil)
	chartRole := into[rbacv1.ClusterRole](t, objs.get(t, "ClusterRole", channel.SliceWriterRole))
	raw, err := os.ReadFile(filepath.Join(repoRoot, "config", "rbac", "slice_writer_role.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var configRole rbacv1.ClusterRole
	if err := utilyaml.Unmarshal(raw, &configRole); err != nil {
		t.Fatal(err)
	}
	want := channel.SliceWriterRules()
	for name, got := range map[string][]rbacv1.PolicyRule{"the chart's": chartRole.Rules, "config/rbac's": configRole.Rules} {
		if !equality.Semantic.DeepEqual(got, want) {
			t.Errorf("%s %s grants %+v, want %+v", name, channel.SliceWriterRole, got, want)
		}
	}
	controller := into[rbacv1.ClusterRole](t, objs.get(t, "ClusterRole", "podipc-controller"))
	for _, r := range controller.Rules {
		if slices.Contains(r.Resources, "endpointslices") && !slices.Equal(r.Verbs, []string{"get", "list", "watch"}) {
			t.Errorf("the controller's ClusterRole may %v endpointslices: it must only read them cluster-wide", r.Verbs)
		}
	}
}
