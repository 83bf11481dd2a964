//go:build e2e

package e2e

import (
	"context"
	"testing"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
)

// waitJobPods waits until the Job has created at least one pod and returns their names.
func waitJobPods(t *testing.T, ns, job string) []string {
	t.Helper()
	var names []string
	err := wait.PollUntilContextTimeout(t.Context(), poll, podTimeout, true, func(ctx context.Context) (bool, error) {
		pods, err := clientset.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "batch.kubernetes.io/job-name=" + job})
		if err != nil {
			return false, err
		}
		names = names[:0]
		for _, p := range pods.Items {
			names = append(names, p.Name)
		}
		return len(names) > 0, nil
	})
	if err != nil {
		t.Fatalf("job %s/%s created no pod: %v", ns, job, err)
	}
	return names
}

// waitJob waits for the Job condition cond to be True.
func waitJob(t *testing.T, ns, name string, cond batchv1.JobConditionType) {
	t.Helper()
	var last *batchv1.Job
	err := wait.PollUntilContextTimeout(t.Context(), poll, podTimeout, true, func(ctx context.Context) (bool, error) {
		j, err := clientset.BatchV1().Jobs(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, client(err)
		}
		last = j
		for _, c := range j.Status.Conditions {
			if c.Type == cond && c.Status == corev1.ConditionTrue {
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("job %s/%s never %s: %v (status %+v)", ns, name, cond, err, last)
	}
}
