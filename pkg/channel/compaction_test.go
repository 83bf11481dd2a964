package channel_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"

	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"sigs.k8s.io/controller-runtime/pkg/client"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/internal/testenv"
)

// TestSlicesCompactWithoutHidingMembers: 300 members join (3 slices), 250 leave, and the
// channel's slices shrink to the one that 50 members need. A watcher of the slices, as
// every sidecar is, must never see a member that stays missing from the union of the
// slices while their endpoints are moved: every state the watch shows is checked.
func TestSlicesCompactWithoutHidingMembers(t *testing.T) {
	ns := newNamespace(t)
	newChannel(t, ns, "wide")
	pods := createPods(t, ns, "wide", 300, 31)
	testenv.Eventually(t, "300 members published", func() error {
		return membersAre(slicesOf(t, ns, "wide"), 300, 3)
	})

	// Every sixth pod stays: the survivors are spread over all three slices, so shrinking
	// to one slice must move some of them.
	stay := map[string]bool{}
	for i, p := range pods {
		if i%6 == 0 {
			stay[p.Name] = true
		}
	}
	w := watchSlices(t, ns, "wide", stay)
	leave := make(chan error, len(pods))
	sem := make(chan struct{}, 8)
	for _, p := range pods {
		if stay[p.Name] {
			continue
		}
		sem <- struct{}{}
		go func() {
			defer func() { <-sem }()
			leave <- env.Client.Delete(context.Background(), p)
		}()
	}
	for range len(pods) - len(stay) {
		if err := <-leave; err != nil {
			t.Fatal(err)
		}
	}

	testenv.Eventually(t, "the slices shrink to one holding the 50 members", func() error {
		if err := w.failure(); err != nil {
			t.Fatal(err)
		}
		return membersAre(slicesOf(t, ns, "wide"), 50, 1)
	})
	// The watch must have seen the rewrite through: the final state, and slices deleted
	// while they still held members that stay (the moves the ordering protects).
	testenv.Eventually(t, "the watcher sees one slice of 50", func() error {
		if err := w.failure(); err != nil {
			t.Fatal(err)
		}
		return w.shows(50, 1)
	})
	if err := w.failure(); err != nil {
		t.Fatal(err)
	}
	if moved := w.movedDeletes(); moved == 0 {
		t.Fatal("no slice holding a staying member was deleted: the test did not exercise a move")
	}
}

// sliceWatcher follows a channel's slices through a watch and checks, after every event,
// that each member in stay is in at least one slice.
type sliceWatcher struct {
	stay map[string]bool

	mu    sync.Mutex
	state map[string][]string // slice name → member pod names, as the watch shows them
	// err is the first state that missed a staying member.
	err error
	// moves counts deleted slices that still held a staying member.
	moves int
}

// watchSlices lists the channel's slices and watches them from the list's resource
// version, so that every state after the list is seen, in order.
func watchSlices(t *testing.T, ns, channel string, stay map[string]bool) *sliceWatcher {
	t.Helper()
	wc, err := client.NewWithWatch(env.Config, client.Options{Scheme: env.Scheme})
	if err != nil {
		t.Fatal(err)
	}
	list := &discoveryv1.EndpointSliceList{}
	sel := client.MatchingLabels{podipcv1alpha1.ChannelLabel: channel}
	if err := wc.List(t.Context(), list, client.InNamespace(ns), sel); err != nil {
		t.Fatal(err)
	}
	wi, err := wc.Watch(t.Context(), &discoveryv1.EndpointSliceList{}, client.InNamespace(ns), sel,
		&client.ListOptions{Raw: &metav1.ListOptions{ResourceVersion: list.ResourceVersion}})
	if err != nil {
		t.Fatal(err)
	}
	w := &sliceWatcher{stay: stay, state: map[string][]string{}}
	for _, s := range list.Items {
		w.state[s.Name] = podNames(s)
	}
	if err := w.missing(); err != nil {
		t.Fatalf("before anything left: %v", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ev := range wi.ResultChan() {
			w.observe(ev)
		}
	}()
	t.Cleanup(func() {
		wi.Stop()
		<-done
	})
	return w
}

func (w *sliceWatcher) observe(ev watch.Event) {
	w.mu.Lock()
	defer w.mu.Unlock()
	s, ok := ev.Object.(*discoveryv1.EndpointSlice)
	if !ok {
		if w.err == nil {
			w.err = fmt.Errorf("watch event %s carries %T", ev.Type, ev.Object)
		}
		return
	}
	switch ev.Type {
	case watch.Added, watch.Modified:
		w.state[s.Name] = podNames(*s)
	case watch.Deleted:
		if slices.ContainsFunc(w.state[s.Name], func(p string) bool { return w.stay[p] }) {
			w.moves++
		}
		delete(w.state, s.Name)
	}
	if err := w.missing(); err != nil && w.err == nil {
		w.err = fmt.Errorf("after %s of slice %s: %w", ev.Type, s.Name, err)
	}
}

// missing reports the staying members that no slice of the current state lists.
func (w *sliceWatcher) missing() error {
	seen := map[string]bool{}
	for _, pods := range w.state {
		for _, p := range pods {
			seen[p] = true
		}
	}
	var gone []string
	for p := range w.stay {
		if !seen[p] {
			gone = append(gone, p)
		}
	}
	if len(gone) > 0 {
		slices.Sort(gone)
		return fmt.Errorf("%d staying members missing from the published set: %v", len(gone), gone)
	}
	return nil
}

// failure returns the first bad state the watcher saw, if any.
func (w *sliceWatcher) failure() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// shows checks that the watcher's current state is n endpoints in count slices.
func (w *sliceWatcher) shows(n, count int) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	total := 0
	for _, pods := range w.state {
		total += len(pods)
	}
	if len(w.state) != count || total != n {
		return fmt.Errorf("the watch shows %d endpoints in %d slices", total, len(w.state))
	}
	return nil
}

func (w *sliceWatcher) movedDeletes() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.moves
}

// membersAre checks that slices list n distinct members in exactly count slices.
func membersAre(got []discoveryv1.EndpointSlice, n, count int) error {
	eps, err := endpointsByPod(got)
	if err != nil {
		return err
	}
	if len(eps) != n || len(got) != count {
		return fmt.Errorf("%d members in %d slices", len(eps), len(got))
	}
	return nil
}

func podNames(s discoveryv1.EndpointSlice) []string {
	var out []string
	for _, ep := range s.Endpoints {
		out = append(out, ep.TargetRef.Name)
	}
	return out
}
