// Package v1alpha1 holds the podipc.dev/v1alpha1 API: the Channel kind, which names a
// channel that pods join, configures how lines are spread over its members, and reports
// how many members it has.
//
// +kubebuilder:object:generate=true
// +groupName=podipc.dev
package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupVersion is the group and version of every kind in this package.
var GroupVersion = schema.GroupVersion{Group: "podipc.dev", Version: "v1alpha1"}

var (
	// SchemeBuilder registers this package's kinds with a scheme.
	SchemeBuilder = runtime.NewSchemeBuilder(addKnownTypes)
	// AddToScheme adds this package's kinds to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

func addKnownTypes(scheme *runtime.Scheme) error {
	scheme.AddKnownTypes(GroupVersion, &Channel{}, &ChannelList{})
	metav1.AddToGroupVersion(scheme, GroupVersion)
	return nil
}
