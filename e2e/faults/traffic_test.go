//go:build e2efaults

package faults

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The two channels and the Deployments whose pods stream on them (testapp stream).
const (
	bcast      = "bcast" // Broadcast, local port 7000
	anyone     = "any"   // AnyOne, local port 7001
	bcastApp   = "bc"
	anyApp     = "anyone"
	reportPort = "8080"
	sidecar    = "podipc-sidecar"
)

// appReport is what GET /report of a testapp stream returns (e2e/testapp/stream.go).
type appReport struct {
	Me       string                           `json:"me"`
	Sent     map[string]int                   `json:"sent"`
	Connects map[string]int                   `json:"connects"`
	Recv     map[string]map[string]flowReport `json:"recv"`
}

type flowReport struct {
	Received   int    `json:"received"`
	Duplicates int    `json:"duplicates"`
	Reordered  int    `json:"reordered"`
	Max        int    `json:"max"`
	Seen       string `json:"seen"`
	seen       []byte
}

func (f *flowReport) has(n int) bool {
	if f.seen == nil && f.Seen != "" {
		f.seen, _ = base64.StdEncoding.DecodeString(f.Seen)
	}
	return n/8 < len(f.seen) && f.seen[n/8]&(1<<(n%8)) != 0
}

// podState is one pod as one poll saw it: its app's report and its sidecar's drop counters.
type podState struct {
	report   *appReport
	dropped  map[string]float64 // "channel/reason" -> podipc_dropped_lines_total
	restarts int32              // of the sidecar container: a restart resets its counters
}

// snapshot is one poll of every streaming pod.
type snapshot struct {
	at   time.Time
	pods map[string]*podState
	// silent are pods that exist and did not answer (their network is down, their app
	// restarts): a snapshot with one is never caught up.
	silent []string
	// unready are pods that exist and are not Ready: not members the Channels send to.
	unready map[string]bool
	// restarts counts each pod's sidecar restarts (the kubelet's restart count).
	restarts map[string]int32
	// terminating are deleted pods still running: only their sidecars' counters are read (a
	// draining sidecar counts what it drops until it exits).
	terminating map[string]map[string]float64
}

func (s *snapshot) report(pod string) *appReport {
	if p := s.pods[pod]; p != nil {
		return p.report
	}
	return nil
}

// poll reads every running streaming pod's report and metrics through the API server's pod
// proxy. A pod that does not answer (being restarted, deleted) is left out.
func poll(ctx context.Context, ns string) (*snapshot, error) {
	pods, err := clientset.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "role=stream"})
	if err != nil {
		return nil, err
	}
	s := &snapshot{at: time.Now(), pods: map[string]*podState{}, unready: map[string]bool{}, restarts: map[string]int32{},
		terminating: map[string]map[string]float64{}}
	var (
		wg sync.WaitGroup
		mu sync.Mutex
	)
	for _, p := range pods.Items {
		if p.DeletionTimestamp != nil {
			if p.Status.PodIP != "" {
				if b, err := proxyGet(ctx, ns, p.Name, "7702", "metrics"); err == nil {
					s.terminating[p.Name] = droppedLines(string(b))
				}
			}
			continue
		}
		s.restarts[p.Name] = sidecarRestarts(&p)
		if !podReady(&p) {
			s.unready[p.Name] = true
		}
		if p.Status.PodIP == "" {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			st := readPod(ctx, ns, &p)
			mu.Lock()
			defer mu.Unlock()
			if st.report != nil {
				s.pods[p.Name] = st
			} else {
				s.silent = append(s.silent, p.Name)
			}
		}()
	}
	wg.Wait()
	return s, nil
}

// readPod reads one pod's report and drop counters; a pod cut off (its veth down) times out
// quickly, so that one poll sees every pod at nearly the same moment.
func readPod(ctx context.Context, ns string, p *corev1.Pod) *podState {
	st := &podState{restarts: sidecarRestarts(p)}
	if b, err := proxyGet(ctx, ns, p.Name, reportPort, "report"); err == nil {
		var r appReport
		if json.Unmarshal(b, &r) == nil {
			st.report = &r
		}
	}
	if b, err := proxyGet(ctx, ns, p.Name, "7702", "metrics"); err == nil {
		st.dropped = droppedLines(string(b))
	}
	return st
}

func proxyGet(ctx context.Context, ns, pod, port, path string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	return clientset.CoreV1().RESTClient().Get().
		AbsPath("/api/v1/namespaces", ns, "pods", pod+":"+port, "proxy", path).DoRaw(ctx)
}

func sidecarRestarts(p *corev1.Pod) int32 {
	for _, c := range p.Status.InitContainerStatuses {
		if c.Name == sidecar {
			return c.RestartCount
		}
	}
	return 0
}

// droppedLines parses podipc_dropped_lines_total{channel="…",reason="…"} samples.
func droppedLines(text string) map[string]float64 {
	out := map[string]float64{}
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, "podipc_dropped_lines_total{") {
			continue
		}
		labels := line[strings.Index(line, "{")+1 : strings.LastIndex(line, "}")]
		var ch, reason string
		for _, kv := range strings.Split(labels, ",") {
			k, v, _ := strings.Cut(kv, "=")
			switch strings.TrimSpace(k) {
			case "channel":
				ch = strings.Trim(v, `"`)
			case "reason":
				reason = strings.Trim(v, `"`)
			}
		}
		f := strings.Fields(line)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			out[ch+"/"+reason] += v
		}
	}
	return out
}

// tally follows one fault from its first poll to its last: the latest state of every pod
// seen, and the drops counted meanwhile, summed over sidecar restarts.
type tally struct {
	first   *snapshot
	latest  map[string]*podState
	dropped map[string]float64 // "channel/reason" -> lines counted during the fault
	// unready holds, per "receiver|sender", the windows of the sender's SEQs written while
	// the receiver was not Ready, so not a member a Broadcast line is sent to.
	unready map[string][]window
	// wasUnready: the receiver was not Ready at the previous poll (its window is open).
	wasUnready map[string]bool
	// restarts is the highest sidecar restart count seen per pod.
	restarts map[string]int32
	// heardAt is, per "receiver|sender", what the sender had written at the receiver's last
	// poll: a receiver deleted since may have had lines after that, which no poll saw.
	heardAt map[string]int
}

func newTally(first *snapshot) *tally {
	t := &tally{first: first, latest: map[string]*podState{}, dropped: map[string]float64{},
		unready: map[string][]window{}, wasUnready: map[string]bool{}, restarts: map[string]int32{}, heardAt: map[string]int{}}
	maps.Copy(t.latest, first.pods)
	maps.Copy(t.restarts, first.restarts)
	// A victim deleted before the poller's first tick was last polled here: the lines its
	// senders wrote after this poll may have reached it unseen (deliveredUnseen).
	t.noteHeard(first)
	return t
}

// noteHeard records, for every pair of pods s polled, what the sender had written then.
func (t *tally) noteHeard(s *snapshot) {
	for to := range s.pods {
		for from, st := range s.pods {
			for _, sent := range st.report.Sent {
				t.heardAt[to+"|"+from] = sent
			}
		}
	}
}

// restartsOf is how often pod's sidecar restarted since the first poll.
func (t *tally) restartsOf(pod string) int {
	return int(t.restarts[pod] - t.first.restarts[pod])
}

// noteUnready records, for every receiver not Ready in s, what each sender had written then.
func (t *tally) noteUnready(s *snapshot) {
	for to := range t.latest {
		if !s.unready[to] {
			t.wasUnready[to] = false
			continue
		}
		for from, st := range s.pods {
			for _, sent := range st.report.Sent {
				key := to + "|" + from
				ws := t.unready[key]
				if t.wasUnready[to] && len(ws) > 0 {
					ws[len(ws)-1].to = sent
				} else {
					t.unready[key] = append(ws, window{sent, sent})
				}
			}
		}
		t.wasUnready[to] = true
	}
}

// whileUnready reports whether SEQ n of from was written while to was not Ready, give or
// take slack lines (readiness reaches the sidecars through the API server a moment later).
func (t *tally) whileUnready(to, from string, n, slack int) bool {
	for _, w := range t.unready[to+"|"+from] {
		if n > w.from-slack && n <= w.to+slack {
			return true
		}
	}
	return false
}

// add takes a later poll into account. A sidecar that restarted since the pod's last poll
// starts its counters from zero: what its new incarnation counted is added whole (what the
// old one counted after the last poll died with it: case (c) of docs/guarantees.md).
func (t *tally) add(s *snapshot) {
	for name, r := range s.restarts {
		t.restarts[name] = max(t.restarts[name], r)
	}
	t.noteUnready(s)
	t.noteHeard(s)
	for name, dropped := range s.terminating {
		if before := t.latest[name]; before != nil {
			t.add1(name, &podState{report: before.report, dropped: dropped, restarts: before.restarts})
		}
	}
	for name, now := range s.pods {
		t.add1(name, now)
	}
}

// add1 takes one pod's later state into account.
func (t *tally) add1(name string, now *podState) {
	{
		before := t.latest[name]
		if now.dropped != nil {
			for k, v := range now.dropped {
				prev := 0.0
				if before != nil && before.dropped != nil && before.restarts == now.restarts {
					prev = before.dropped[k]
				}
				if v >= prev {
					t.dropped[k] += v - prev
				} else {
					t.dropped[k] += v
				}
			}
		}
		if before != nil && now.dropped == nil {
			now.dropped = before.dropped // the metrics did not answer this time
		}
		t.latest[name] = now
	}
}

// caughtUp reports whether, in s, every receiver has heard from every sender of ref a line
// numbered at least what that sender had sent at ref: traffic is flowing at its rate again.
// On the AnyOne channel the receivers together must have. Only the pods of members count: a
// pod deleted since is judged by account, and its replacement never hears lines sent before
// it joined.
func caughtUp(ref, s, members *snapshot) (bool, string) {
	var behind []string
	for _, name := range s.silent {
		if members.pods[name] != nil {
			behind = append(behind, name+" does not answer")
		}
	}
	for from, st := range ref.pods {
		if s.pods[from] == nil || members.pods[from] == nil {
			continue
		}
		for ch, sent := range st.report.Sent {
			if sent == 0 {
				continue
			}
			best := 0
			for to, rst := range s.pods {
				if (to == from && ch == bcast) || members.pods[to] == nil {
					continue
				}
				m := rst.report.Recv[ch][from].Max
				if ch == bcast && sameApp(from, to) && m < sent {
					behind = append(behind, fmt.Sprintf("%s<-%s %s %d<%d", to, from, ch, m, sent))
				}
				best = max(best, m)
			}
			if ch == anyone && best < sent {
				behind = append(behind, fmt.Sprintf("any<-%s %d<%d", from, best, sent))
			}
		}
	}
	slices.Sort(behind)
	return len(behind) == 0, strings.Join(behind, " ")
}

// sameApp: pods of one Deployment share the name prefix bc-… or anyone-….
func sameApp(a, b string) bool {
	return strings.HasPrefix(a, bcastApp+"-") == strings.HasPrefix(b, bcastApp+"-")
}
