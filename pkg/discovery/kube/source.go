// Package kube is the sidecar's Kubernetes discovery.Source: it reads the pod's Channels
// and their EndpointSlices (published by the podipc controller) with client-go informers,
// in the pod's own namespace only and only for the channels the pod names, and turns them
// into discovery.State snapshots.
//
// It needs read access to those Channels and to EndpointSlices in the namespace, which
// the controller grants the member pods' service account.
//
// While the API server is unreachable the informers keep their last contents, so the
// sidecar keeps the last known members; when it comes back the informers list again and
// the next snapshot catches up.
package kube

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	apiruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/internal/wake"
	"github.com/podipc/podipc/pkg/discovery"
)

// channelsResource is the Channel resource, for the dynamic client.
var channelsResource = schema.GroupVersionResource{Group: podipcv1alpha1.GroupVersion.Group, Version: podipcv1alpha1.GroupVersion.Version, Resource: "channels"}

// slicesResource is the EndpointSlice resource, for the dynamic client. (Spelled out
// rather than taken from k8s.io/api/discovery/v1: see managedByLabel.)
var slicesResource = schema.GroupVersionResource{Group: "discovery.k8s.io", Version: "v1", Resource: "endpointslices"}

// settle is how long Run lets a burst of events accumulate into one snapshot.
const settle = 20 * time.Millisecond

// Source reads the channels of one pod from the Kubernetes API.
type Source struct {
	// Config reaches the API server (in a pod: rest.InClusterConfig()).
	Config *rest.Config
	// Namespace is the pod's namespace; nothing outside it is read.
	Namespace string
	// Channels are the channel names the pod serves (PODIPC_CHANNELS).
	Channels []string
	// Log receives what the source notices (Channel missing, decode errors).
	Log logr.Logger
}

var _ discovery.Source = (*Source)(nil)

// Run implements discovery.Source.
func (s *Source) Run(ctx context.Context, update func(discovery.State)) error {
	if len(s.Channels) == 0 {
		return errors.New("kube discovery: no channels to serve")
	}
	// The dynamic client alone: the typed clientset would register every built-in API
	// group in its scheme at start-up, which the sidecar pays for in memory and never uses.
	dyn, err := dynamic.NewForConfig(s.Config)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	dirty := make(chan struct{}, 1)
	// One narrow informer per channel name (a metadata.name field selector, which the
	// members' Role authorizes by resourceNames), and one for the EndpointSlices of all
	// of them.
	var watched []*watchedInformer
	channels := map[string]cache.SharedIndexInformer{}
	for _, name := range s.Channels {
		sel := fields.OneTermEqualSelector("metadata.name", name).String()
		w := s.newWatched("Channel "+name, dyn.Resource(channelsResource).Namespace(s.Namespace),
			func(o *metav1.ListOptions) { o.FieldSelector = sel }, dirty)
		channels[name] = w
		watched = append(watched, w)
	}
	slicesInf := s.newWatched("EndpointSlices", dyn.Resource(slicesResource).Namespace(s.Namespace),
		func(o *metav1.ListOptions) { o.LabelSelector = s.sliceSelector() }, dirty)
	watched = append(watched, slicesInf)
	for _, w := range watched {
		if err := w.watch(s.Log, dirty); err != nil {
			return err
		}
	}
	var wg sync.WaitGroup
	defer func() { // Run returns only once its informers have stopped
		cancel()
		wg.Wait()
	}()
	for _, w := range watched {
		wg.Go(func() { w.RunWithContext(ctx) })
	}
	if !waitForSync(ctx, watched) {
		return nil // ctx ended: a normal stop
	}

	var last *discovery.State
	for {
		st := s.snapshot(channels, slicesInf.GetStore())
		if last == nil || !reflect.DeepEqual(*last, st) {
			update(st)
			last = &st
		}
		select {
		case <-ctx.Done():
			return nil
		case <-dirty:
		}
		select { // let a burst of events settle into one snapshot
		case <-ctx.Done():
			return nil
		case <-time.After(settle):
		}
	}
}

// watchedInformer is an informer whose access errors are remembered.
type watchedInformer struct {
	cache.SharedIndexInformer
	what string
	// forbidden is set when listing was refused by RBAC: the pod's service account is
	// bound to a channel's Role only once the Channel exists and lists the pod, so a
	// channel named before it is created cannot be read yet. The informer keeps retrying.
	forbidden atomic.Bool
}

// forbiddenRetry is how often a list or watch refused by RBAC is retried. A refusal is
// expected for a while (until the controller binds the pod's service account), and the
// reflector's own backoff would grow to 30 s with up to 100% jitter: a sidecar refused a
// few times in a row was then blind for up to a minute after access had been granted.
const forbiddenRetry = time.Second

// newWatched returns an informer of the resource res, listed and watched with tweak
// applied to the options, whose RBAC refusals are retried every forbiddenRetry.
func (s *Source) newWatched(what string, res dynamic.ResourceInterface, tweak func(*metav1.ListOptions), dirty chan struct{}) *watchedInformer {
	w := &watchedInformer{what: what}
	// refused remembers a refusal and waits before the caller tries again; it returns
	// false if ctx ended first.
	refused := func(ctx context.Context, err error) bool {
		if !w.forbidden.Swap(true) {
			s.Log.V(1).Info("Access refused, retrying", "what", what, "every", forbiddenRetry, "err", err.Error())
			wake.Up(dirty)
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(forbiddenRetry):
			return true
		}
	}
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (apiruntime.Object, error) {
			tweak(&o)
			for {
				obj, err := res.List(ctx, o)
				if !apierrors.IsForbidden(err) || !refused(ctx, err) {
					return obj, err
				}
			}
		},
		// With the WatchListClient feature (on by default) the initial list is a watch.
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			tweak(&o)
			for {
				wi, err := res.Watch(ctx, o)
				if !apierrors.IsForbidden(err) || !refused(ctx, err) {
					return wi, err
				}
			}
		},
	}
	w.SharedIndexInformer = cache.NewSharedIndexInformer(lw, &unstructured.Unstructured{}, 0, cache.Indexers{})
	return w
}

// watch signals dirty on every change and remembers access errors.
func (w *watchedInformer) watch(log logr.Logger, dirty chan struct{}) error {
	notify := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { wake.Up(dirty) },
		UpdateFunc: func(any, any) { wake.Up(dirty) },
		DeleteFunc: func(any) { wake.Up(dirty) },
	}
	if _, err := w.AddEventHandler(notify); err != nil {
		return err
	}
	return w.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) {
		if apierrors.IsForbidden(err) {
			w.forbidden.Store(true)
			wake.Up(dirty)
		}
		log.V(1).Info("Watch failed, retrying", "what", w.what, "err", err.Error())
	})
}

// waitForSync waits until every informer has synced or been refused access (and so has
// nothing to show yet), so that the first snapshot does not wait for channels the pod
// cannot read yet, but does wait while the API server is unreachable. It returns false
// if ctx ended first.
func waitForSync(ctx context.Context, watched []*watchedInformer) bool {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		done := true
		for _, w := range watched {
			done = done && (w.HasSynced() || w.forbidden.Load())
		}
		if done {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-tick.C:
		}
	}
}

// sliceSelector selects the controller's EndpointSlices of the pod's channels.
func (s *Source) sliceSelector() string {
	return fmt.Sprintf("%s in (%s),%s=%s", podipcv1alpha1.ChannelLabel, strings.Join(s.Channels, ","),
		managedByLabel, podipcv1alpha1.ManagedBy)
}

// snapshot builds the state from the informers' stores.
func (s *Source) snapshot(channels map[string]cache.SharedIndexInformer, slices cache.Store) discovery.State {
	byChannel := map[string][]memberSlice{}
	for _, o := range slices.List() {
		es := &endpointSlice{}
		if err := apiruntime.DefaultUnstructuredConverter.FromUnstructured(o.(*unstructured.Unstructured).Object, es); err != nil {
			s.Log.Error(err, "Ignoring an EndpointSlice that cannot be decoded", "endpointSlice", o.(*unstructured.Unstructured).GetName())
			continue
		}
		published, err := publishedMembers(es)
		if err != nil {
			s.Log.Error(err, "Ignoring an EndpointSlice whose published members cannot be decoded: its endpoints are not members", "endpointSlice", o.(*unstructured.Unstructured).GetName())
			continue
		}
		name := es.Metadata.Labels[podipcv1alpha1.ChannelLabel]
		byChannel[name] = append(byChannel[name], memberSlice{es, published})
	}
	st := discovery.State{Channels: map[string]discovery.Channel{}}
	for name, inf := range channels {
		obj, ok, _ := inf.GetStore().GetByKey(s.Namespace + "/" + name)
		if !ok {
			continue // not (yet) created: not served
		}
		ch := &podipcv1alpha1.Channel{}
		if err := apiruntime.DefaultUnstructuredConverter.FromUnstructured(obj.(*unstructured.Unstructured).Object, ch); err != nil {
			s.Log.Error(err, "Ignoring a Channel that cannot be decoded", "channel", name)
			continue
		}
		st.Channels[name] = discovery.Channel{
			Name:    name,
			Spec:    SpecFromChannel(ch),
			Members: membersFromSlices(ch, byChannel[name]),
		}
	}
	return st
}
