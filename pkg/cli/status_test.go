package cli

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"

	"github.com/podipc/podipc/pkg/peer"
	"github.com/podipc/podipc/pkg/router"
)

// fakeSidecar holds the series a sidecar exports, registered by the sidecar's own
// constructors (router.NewMetrics, peer.NewMetrics), so a renamed metric breaks the
// tests below as it would break podipc status.
type fakeSidecar struct {
	reg    *prometheus.Registry
	router *router.Metrics
	peer   *peer.Metrics
}

func newFakeSidecar() *fakeSidecar {
	reg := prometheus.NewRegistry()
	return &fakeSidecar{reg: reg, router: router.NewMetrics(reg), peer: peer.NewMetrics(reg)}
}

// link sets the outbound link to peer: up or down since changed, with unacked bytes.
func (f *fakeSidecar) link(peer string, up bool, changed time.Time, unacked float64) {
	v := 0.0
	if up {
		v = 1
	}
	f.peer.LinkUp.WithLabelValues(peer).Set(v)
	f.peer.LinkChanged.WithLabelValues(peer).Set(float64(changed.UnixNano()) / 1e9)
	f.peer.LinkUnacked.WithLabelValues(peer).Set(unacked)
}

// scrape renders the registry as the admin port's /metrics does.
func (f *fakeSidecar) scrape(t *testing.T) *podMetrics {
	t.Helper()
	mfs, err := f.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	enc := expfmt.NewEncoder(&b, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, mf := range mfs {
		if err := enc.Encode(mf); err != nil {
			t.Fatal(err)
		}
	}
	pm, err := parseMetrics(b.Bytes(), "orders")
	if err != nil {
		t.Fatal(err)
	}
	return pm
}

func TestStatusReport(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	members := []member{{Pod: "pod-1", Ready: true}, {Pod: "pod-2", Ready: true}, {Pod: "pod-3", Ready: true}}
	pods := []string{"pod-1", "pod-2", "pod-3"}

	// healthy: every sidecar links to the other two, traffic flows, nothing dropped.
	healthy := func() map[string]*fakeSidecar {
		fs := map[string]*fakeSidecar{}
		for _, p := range pods {
			f := newFakeSidecar()
			for _, q := range pods {
				if q != p {
					f.link(q, true, now.Add(-5*time.Minute), 0)
				}
			}
			f.router.QueueBytes.WithLabelValues("orders").Set(0)
			f.router.LinesIn.WithLabelValues("orders")
			f.router.LinesOut.WithLabelValues("orders")
			fs[p] = f
		}
		return fs
	}
	tests := map[string]struct {
		// change alters the second read of the sidecars.
		change  func(fs map[string]*fakeSidecar)
		fail    string // a pod whose second read fails
		verdict string
		table   []string
	}{
		"all connected, no drops": {
			change: func(fs map[string]*fakeSidecar) {
				fs["pod-1"].router.LinesIn.WithLabelValues("orders").Add(50)
				fs["pod-2"].router.LinesOut.WithLabelValues("orders").Add(50)
				fs["pod-3"].router.LinesOut.WithLabelValues("orders").Add(50)
				// Another channel's drops are not this channel's.
				fs["pod-3"].router.Dropped.WithLabelValues("events", router.ReasonQueueFull).Add(9)
			},
			verdict: "all 3 members connected to each other, no drops in 5s",
			table:   []string{"pod-1   true    10.0", "pod-1   pod-2   up     5m", "pod-3   pod-2   up"},
		},
		"one link down": {
			change: func(fs map[string]*fakeSidecar) {
				fs["pod-3"].link("pod-2", false, now.Add(-43*time.Second), 2048)
				fs["pod-3"].router.Dropped.WithLabelValues("orders", router.ReasonPeerRestarted).Add(1203)
			},
			verdict: "pod-3 cannot reach pod-2: link down 43s, 1,203 lines counted peer_restarted",
			table:   []string{"pod-3   pod-2   down   43s     2,048", "peer_restarted=1,203"},
		},
		"drops without a broken link": {
			change: func(fs map[string]*fakeSidecar) {
				fs["pod-2"].router.Dropped.WithLabelValues("orders", router.ReasonQueueFull).Add(1)
			},
			verdict: "pod-2 dropped 1 line counted queue_full",
		},
		"a link missing": {
			change: func(fs map[string]*fakeSidecar) {
				fs["pod-1"].peer.LinkUp.DeleteLabelValues("pod-3")
				fs["pod-1"].peer.LinkChanged.DeleteLabelValues("pod-3")
				fs["pod-1"].peer.LinkUnacked.DeleteLabelValues("pod-3")
			},
			verdict: "pod-1 has no link to pod-3; no drops in 5s",
			table:   []string{"pod-1   pod-3   none"},
		},
		"a member cut off": {
			// Its interface is down: nobody reaches it, and neither does the pod proxy.
			change: func(fs map[string]*fakeSidecar) {
				fs["pod-1"].link("pod-2", false, now.Add(-16*time.Second), 765)
				fs["pod-3"].link("pod-2", false, now.Add(-16*time.Second), 768)
			},
			fail: "pod-2",
			verdict: "pod-1 cannot reach pod-2: link down 16s; pod-3 cannot reach pod-2: link down 16s; " +
				"cannot read the metrics of pod-2: pods \"pod-2\" is forbidden; no drops in 5s",
			table: []string{"pod-1   pod-2   down   16s   765", "pod-2   pod-3   unknown   -   -"},
		},
		"metrics unreadable": {
			fail:    "pod-2",
			verdict: "cannot read the metrics of pod-2: pods \"pod-2\" is forbidden; no drops in 5s",
			table:   []string{"pod-2   true    ?", "pod-2   pod-1   unknown"},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			fs := healthy()
			read := func(at time.Time) *snapshot {
				s := &snapshot{at: at, members: members, metrics: map[string]*podMetrics{}}
				for _, p := range pods {
					s.metrics[p] = fs[p].scrape(t)
				}
				return s
			}
			prev := read(now.Add(-5 * time.Second))
			if tc.change != nil {
				tc.change(fs)
			}
			cur := read(now)
			if tc.fail != "" {
				cur.metrics[tc.fail] = &podMetrics{Err: errors.New(`pods "pod-2" is forbidden`)}
			}
			r := newReport("orders", "shop", prev, cur, now)
			out := r.String()
			if r.verdict != tc.verdict {
				t.Errorf("verdict %q, want %q\n%s", r.verdict, tc.verdict, out)
			}
			// Compare rows with single spaces: the column widths follow the contents.
			flat := strings.Join(strings.Fields(strings.ReplaceAll(out, "\n", " | ")), " ")
			for _, want := range tc.table {
				if !strings.Contains(flat, strings.Join(strings.Fields(want), " ")) {
					t.Errorf("table lacks %q:\n%s", want, out)
				}
			}
		})
	}
}

func TestStatusReportFewMembers(t *testing.T) {
	now := time.Now()
	one := &snapshot{at: now, members: []member{{Pod: "pod-1", Ready: true}}, metrics: map[string]*podMetrics{"pod-1": {Drops: map[string]float64{}}}}
	if v := newReport("orders", "shop", one, one, now).verdict; v != "1 member, no other member to connect to, no drops in 0s" {
		t.Errorf("one member: %q", v)
	}
	none := &snapshot{at: now}
	if v := newReport("orders", "shop", none, none, now).verdict; v != "no members of channel orders in namespace shop" {
		t.Errorf("no members: %q", v)
	}
	notReady := &snapshot{at: now, members: []member{{Pod: "pod-1", Ready: true}, {Pod: "pod-2"}}, metrics: map[string]*podMetrics{
		"pod-1": {Drops: map[string]float64{}, Links: map[string]linkMetrics{"pod-2": {Up: true}}},
		"pod-2": {Drops: map[string]float64{}, Links: map[string]linkMetrics{"pod-1": {Up: true}}},
	}}
	if v := newReport("orders", "shop", notReady, notReady, now).verdict; v != "pod-2 is not ready; no drops in 0s" {
		t.Errorf("a member not ready: %q", v)
	}
}

func TestCount(t *testing.T) {
	for n, want := range map[float64]string{0: "0", 999: "999", 1000: "1,000", 1203: "1,203", 1234567: "1,234,567", -1500: "-1,500"} {
		if got := count(n); got != want {
			t.Errorf("count(%v) = %q, want %q", n, got, want)
		}
	}
}

// scraperFunc adapts a function to scraper.
type scraperFunc func(ctx context.Context, pod string) ([]byte, error)

func (f scraperFunc) scrape(ctx context.Context, pod string) ([]byte, error) { return f(ctx, pod) }

// TestStatusWatch runs status --watch over members published in EndpointSlices of a
// real API server, each pod's metrics rendered from a sidecar's own series: it prints a
// report per interval, the later one naming the link that went down meanwhile, and stops
// cleanly when interrupted.
func TestStatusWatch(t *testing.T) {
	ctx := t.Context()
	const ns = "statuswatch"
	createNamespace(t, ns)
	if err := env.Client.Create(ctx, &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "orders"}}); err != nil {
		t.Fatal(err)
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: "orders-a", Labels: map[string]string{channelLabel: "orders"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{endpoint(ns, "pod-a", "10.0.0.1", false), endpoint(ns, "pod-b", "10.0.0.2", false)},
	}
	if err := env.Client.Create(ctx, slice); err != nil {
		t.Fatal(err)
	}
	sidecars := map[string]*fakeSidecar{"pod-a": newFakeSidecar(), "pod-b": newFakeSidecar()}
	var mu sync.Mutex
	sidecars["pod-a"].link("pod-b", true, time.Now(), 0)
	sidecars["pod-b"].link("pod-a", true, time.Now(), 0)
	scr := scraperFunc(func(_ context.Context, pod string) ([]byte, error) {
		mu.Lock()
		defer mu.Unlock()
		mfs, err := sidecars[pod].reg.Gather()
		if err != nil {
			return nil, err
		}
		var b bytes.Buffer
		enc := expfmt.NewEncoder(&b, expfmt.NewFormat(expfmt.TypeTextPlain))
		for _, mf := range mfs {
			_ = enc.Encode(mf)
		}
		return b.Bytes(), nil
	})
	cs, err := kubernetes.NewForConfig(env.Config)
	if err != nil {
		t.Fatal(err)
	}
	var out syncBuffer
	wctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	s := statusCmd{scr: scr, cs: cs, ns: ns, channel: "orders", interval: 200 * time.Millisecond, out: &out}
	go func() { done <- s.watch(wctx, false) }()
	waitFor(t, func() bool {
		return strings.Contains(out.String(), "all 2 members connected to each other, no drops in")
	}, "a healthy report")
	mu.Lock()
	sidecars["pod-b"].link("pod-a", false, time.Now(), 10)
	mu.Unlock()
	waitFor(t, func() bool { return strings.Contains(out.String(), "pod-b cannot reach pod-a: link down") }, "a report naming the broken link")
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("watch: %v", err)
	}
	if n := strings.Count(out.String(), "Channel statuswatch/orders: 2 members, 2 ready"); n < 2 {
		t.Fatalf("%d reports printed:\n%s", n, out.String())
	}
}
