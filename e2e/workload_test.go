//go:build e2e

package e2e

import (
	"context"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/utils/ptr"
)

// TestDeploymentRollsOutAndIsGarbageCollected checks the controllers the podipc chart relies on:
// a Deployment gets a ReplicaSet and ready pods, and deleting it removes both through the
// garbage collector (owner references), not through the client.
func TestDeploymentRollsOutAndIsGarbageCollected(t *testing.T) {
	ns := newNamespace(t, nil)
	tmpl := testappPod("web", "serve", ":8080")
	deploy := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr.To[int32](2),
			Selector: &metav1.LabelSelector{MatchLabels: tmpl.Labels},
			Template: corev1.PodTemplateSpec{ObjectMeta: tmpl.ObjectMeta, Spec: tmpl.Spec},
		},
	}
	deployments := clientset.AppsV1().Deployments(ns)
	if _, err := deployments.Create(t.Context(), deploy, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var last *appsv1.Deployment
	err := wait.PollUntilContextTimeout(t.Context(), poll, podTimeout, true, func(ctx context.Context) (bool, error) {
		d, err := deployments.Get(ctx, "web", metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		last = d
		return d.Status.ObservedGeneration == d.Generation && d.Status.AvailableReplicas == 2, nil
	})
	if err != nil {
		t.Fatalf("deployment never had 2 available replicas: %v (status %+v)", err, last.Status)
	}

	if err := deployments.Delete(t.Context(), "web", metav1.DeleteOptions{
		PropagationPolicy: ptr.To(metav1.DeletePropagationBackground),
	}); err != nil {
		t.Fatal(err)
	}
	selector := metav1.FormatLabelSelector(deploy.Spec.Selector)
	err = wait.PollUntilContextTimeout(t.Context(), poll, podTimeout, true, func(ctx context.Context) (bool, error) {
		rs, err := clientset.AppsV1().ReplicaSets(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			return false, err
		}
		pods, err := clientset.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			return false, err
		}
		return len(rs.Items) == 0 && len(pods.Items) == 0, nil
	})
	if err != nil {
		t.Fatalf("the garbage collector never removed the deployment's ReplicaSet and pods: %v", err)
	}
}
