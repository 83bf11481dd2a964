package cli

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/spf13/cobra"
	"golang.org/x/term"
	"k8s.io/apimachinery/pkg/util/duration"
	"k8s.io/client-go/kubernetes"
)

// adminPort is the sidecar's admin port (podipc-admin), which serves /metrics.
const adminPort = "7702"

// scrapeTimeout bounds reading one sidecar's metrics through the API server.
const scrapeTimeout = 10 * time.Second

func newStatusCommand(streams Streams) *cobra.Command {
	var o kubeOptions
	var interval time.Duration
	var watch bool
	cmd := &cobra.Command{
		Use:   "status CHANNEL",
		Short: "Show a channel's members, their peer links, traffic and drops",
		Long: `status reads the metrics of every member pod's sidecar through the API server's pod
proxy (pods/proxy on the admin port 7702), twice, --interval apart, and prints one table
for the channel:

  - each member: whether it is ready, lines in and out per second (from and to its
    local apps), bytes queued for its apps, and lines dropped by reason during the
    interval;
  - each ordered pair of members: the state of the peer link from one to the other,
    since when, and the bytes it holds unacknowledged;
  - a one-line verdict: that every member reaches every other with no drops, or which
    member cannot reach which and what was dropped.

It needs only permission to list EndpointSlices and to get pods/proxy in the channel's
namespace. --watch refreshes the table every interval until interrupted.`,
		Example: `  podipc status orders -n shop

  # refresh every 2 seconds, like top
  podipc status orders -n shop --watch --interval 2s`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if interval < 100*time.Millisecond {
				return fmt.Errorf("--interval %s is too short: at least 100ms", interval)
			}
			cs, ns, err := o.clientset(streams)
			if err != nil {
				return err
			}
			s := statusCmd{scr: proxyScraper{cs: cs, ns: ns}, cs: cs, ns: ns, channel: args[0], interval: interval, out: streams.Out}
			if watch {
				return s.watch(cmd.Context(), isTerminal(streams.Out))
			}
			return s.once(cmd.Context())
		},
	}
	o.addFlags(cmd.Flags())
	cmd.Flags().DurationVar(&interval, "interval", 5*time.Second, "time between the two reads of the metrics the rates and drops are computed from")
	cmd.Flags().BoolVarP(&watch, "watch", "w", false, "refresh the table every interval")
	return cmd
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// scraper reads a member pod's sidecar metrics.
type scraper interface {
	scrape(ctx context.Context, pod string) ([]byte, error)
}

// proxyScraper reads /metrics through the API server's pod proxy.
type proxyScraper struct {
	cs kubernetes.Interface
	ns string
}

func (p proxyScraper) scrape(ctx context.Context, pod string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, scrapeTimeout)
	defer cancel()
	b, err := p.cs.CoreV1().Pods(p.ns).ProxyGet("http", pod, adminPort, "metrics", nil).DoRaw(ctx)
	if errors.Is(err, context.DeadlineExceeded) {
		// The pod proxy's own error is a long URL; what matters is that nothing answered.
		return nil, fmt.Errorf("no answer through the API server's pod proxy within %s", scrapeTimeout)
	}
	return b, err
}

// statusCmd is one run of podipc status.
type statusCmd struct {
	scr      scraper
	cs       kubernetes.Interface
	ns       string
	channel  string
	interval time.Duration
	out      io.Writer
}

func (s *statusCmd) once(ctx context.Context) error {
	prev, err := s.sample(ctx)
	if err != nil {
		return err
	}
	select {
	case <-ctx.Done():
		return nil
	case <-time.After(s.interval):
	}
	cur, err := s.sample(ctx)
	if err != nil {
		return err
	}
	_, err = io.WriteString(s.out, newReport(s.channel, s.ns, prev, cur, time.Now()).String())
	return err
}

// watch prints a report every interval; on a terminal each replaces the last, as top does.
func (s *statusCmd) watch(ctx context.Context, tty bool) error {
	prev, err := s.sample(ctx)
	if err != nil {
		return err
	}
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		cur, err := s.sample(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		text := newReport(s.channel, s.ns, prev, cur, time.Now()).String()
		if tty {
			text = "\033[H\033[2J" + text // home, clear screen
		} else {
			text += "\n"
		}
		if _, err := io.WriteString(s.out, text); err != nil {
			return err
		}
		prev = cur
	}
}

// snapshot is one read of the channel: its members and what each sidecar reported.
type snapshot struct {
	at      time.Time
	members []member
	// metrics maps a member pod to its sidecar's figures; a pod whose read failed has
	// Err set.
	metrics map[string]*podMetrics
}

// sample lists the members and reads every sidecar's metrics at once.
func (s *statusCmd) sample(ctx context.Context) (*snapshot, error) {
	ms, err := listMembers(ctx, s.cs, s.ns, s.channel)
	if err != nil {
		return nil, err
	}
	snap := &snapshot{at: time.Now(), members: ms, metrics: map[string]*podMetrics{}}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, m := range ms {
		wg.Go(func() {
			pm := &podMetrics{}
			body, err := s.scr.scrape(ctx, m.Pod)
			if err == nil {
				pm, err = parseMetrics(body, s.channel)
			}
			pm.Err = err
			mu.Lock()
			snap.metrics[m.Pod] = pm
			mu.Unlock()
		})
	}
	wg.Wait()
	return snap, nil
}

// podMetrics are the figures of one sidecar that status shows, for one channel.
type podMetrics struct {
	Err        error
	LinesIn    float64
	LinesOut   float64
	QueueBytes float64
	Drops      map[string]float64
	Links      map[string]linkMetrics
}

// linkMetrics is one outbound peer link, by the podipc_peer_link_* series.
type linkMetrics struct {
	Up      bool
	Changed time.Time
	Unacked float64
}

// parseMetrics reads the Prometheus text exposition of a sidecar.
func parseMetrics(body []byte, channel string) (*podMetrics, error) {
	pm := &podMetrics{Drops: map[string]float64{}, Links: map[string]linkMetrics{}}
	dec := expfmt.NewDecoder(bytes.NewReader(body), expfmt.NewFormat(expfmt.TypeTextPlain))
	for {
		var mf dto.MetricFamily
		err := dec.Decode(&mf)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("reading the sidecar's metrics: %w", err)
		}
		for _, m := range mf.GetMetric() {
			pm.add(mf.GetName(), m, channel)
		}
	}
	return pm, nil
}

func (pm *podMetrics) add(name string, m *dto.Metric, channel string) {
	labels := map[string]string{}
	for _, lp := range m.GetLabel() {
		labels[lp.GetName()] = lp.GetValue()
	}
	v := m.GetCounter().GetValue() + m.GetGauge().GetValue() + m.GetUntyped().GetValue()
	if ch, ok := labels["channel"]; ok && ch != channel {
		return
	}
	peer := labels["peer"]
	switch name {
	case "podipc_lines_in_total":
		pm.LinesIn = v
	case "podipc_lines_out_total":
		pm.LinesOut = v
	case "podipc_queue_bytes":
		pm.QueueBytes = v
	case "podipc_dropped_lines_total":
		pm.Drops[labels["reason"]] += v
	case "podipc_peer_link_up":
		l := pm.Links[peer]
		l.Up = v == 1
		pm.Links[peer] = l
	case "podipc_peer_link_last_change_timestamp_seconds":
		l := pm.Links[peer]
		l.Changed = time.Unix(0, int64(v*1e9))
		pm.Links[peer] = l
	case "podipc_peer_link_unacked_bytes":
		l := pm.Links[peer]
		l.Unacked = v
		pm.Links[peer] = l
	}
}

// report is what status prints: two snapshots' difference.
type report struct {
	channel, ns string
	window      time.Duration
	now         time.Time
	rows        []memberRow
	links       []linkRow
	verdict     string
}

type memberRow struct {
	pod, ready      string
	in, out, queue  string
	drops           map[string]int64
	err             error
	readyOK, active bool
}

type linkRow struct {
	from, to, state, since, unacked string
	problem                         string
}

// newReport compares the snapshots prev and cur (taken in that order) at now.
func newReport(channel, ns string, prev, cur *snapshot, now time.Time) *report {
	r := &report{channel: channel, ns: ns, window: cur.at.Sub(prev.at).Round(100 * time.Millisecond), now: now}
	secs := cur.at.Sub(prev.at).Seconds()
	var active []member
	for _, m := range cur.members {
		row := memberRow{pod: m.Pod, ready: readiness(m), readyOK: m.Ready && !m.Terminating, active: !m.Terminating}
		pm, old := cur.metrics[m.Pod], prev.metrics[m.Pod]
		switch {
		case pm == nil || pm.Err != nil:
			row.err = cmp.Or(pm, &podMetrics{Err: errors.New("not read")}).Err
			row.in, row.out, row.queue = "?", "?", "?"
		default:
			if old == nil || old.Err != nil {
				old = &podMetrics{Drops: map[string]float64{}}
			}
			row.in = perSecond(pm.LinesIn-old.LinesIn, secs)
			row.out = perSecond(pm.LinesOut-old.LinesOut, secs)
			row.queue = count(pm.QueueBytes)
			row.drops = map[string]int64{}
			for reason, v := range pm.Drops {
				if d := counterDelta(v, old.Drops[reason]); d > 0 {
					row.drops[reason] = d
				}
			}
		}
		r.rows = append(r.rows, row)
		if !m.Terminating {
			active = append(active, m)
		}
	}
	r.links = linkRows(active, cur, now)
	r.verdict = r.judge(len(active))
	return r
}

func readiness(m member) string {
	switch {
	case m.Terminating:
		return "terminating"
	case m.Ready:
		return "true"
	default:
		return "false"
	}
}

// linkRows lists the peer link of every ordered pair of members, as the sending
// member's sidecar reports it.
func linkRows(ms []member, cur *snapshot, now time.Time) []linkRow {
	var rows []linkRow
	for _, from := range ms {
		pm := cur.metrics[from.Pod]
		for _, to := range ms {
			if from.Pod == to.Pod {
				continue
			}
			row := linkRow{from: from.Pod, to: to.Pod, state: "unknown", since: "-", unacked: "-"}
			l, ok := linkMetrics{}, false
			if pm != nil && pm.Err == nil {
				l, ok = pm.Links[to.Pod]
				row.state = "none"
			}
			switch {
			case pm == nil || pm.Err != nil:
				// Said once per member in the verdict.
			case !ok:
				row.problem = fmt.Sprintf("%s has no link to %s", from.Pod, to.Pod)
			default:
				row.state, row.unacked = "up", count(l.Unacked)
				if !l.Changed.IsZero() {
					row.since = duration.HumanDuration(now.Sub(l.Changed))
				}
				if !l.Up {
					row.state = "down"
					row.problem = fmt.Sprintf("%s cannot reach %s: link down %s", from.Pod, to.Pod, row.since)
				}
			}
			rows = append(rows, row)
		}
	}
	return rows
}

// judge is the one-line verdict.
func (r *report) judge(active int) string {
	// Most specific first: broken links, then members not ready or not read, then drops.
	var problems, members []string
	drops := map[string]map[string]int64{}
	for _, row := range r.rows {
		switch {
		case row.err != nil:
			members = append(members, fmt.Sprintf("cannot read the metrics of %s: %v", row.pod, row.err))
		case row.active && !row.readyOK:
			members = append(members, row.pod+" is not ready")
		}
		if len(row.drops) > 0 {
			drops[row.pod] = row.drops
		}
	}
	for _, l := range r.links {
		if l.problem == "" {
			continue
		}
		p := l.problem
		if d := drops[l.from]; d != nil {
			p += ", " + dropText(d)
			delete(drops, l.from)
		}
		problems = append(problems, p)
	}
	problems = append(problems, members...)
	for _, pod := range slices.Sorted(maps.Keys(drops)) {
		problems = append(problems, pod+" dropped "+dropText(drops[pod]))
	}
	window := duration.HumanDuration(r.window)
	dropFree := len(drops) == 0 && !slices.ContainsFunc(problems, func(p string) bool { return strings.Contains(p, " counted ") })
	switch {
	case active == 0:
		return fmt.Sprintf("no members of channel %s in namespace %s", r.channel, r.ns)
	case len(problems) == 0 && active == 1:
		return fmt.Sprintf("1 member, no other member to connect to, no drops in %s", window)
	case len(problems) == 0:
		return fmt.Sprintf("all %d members connected to each other, no drops in %s", active, window)
	case dropFree:
		return strings.Join(problems, "; ") + "; no drops in " + window
	default:
		return strings.Join(problems, "; ")
	}
}

// dropText says "1,203 lines counted peer_restarted", reasons sorted.
func dropText(d map[string]int64) string {
	parts := make([]string, 0, len(d))
	for _, reason := range slices.Sorted(maps.Keys(d)) {
		noun := "lines"
		if d[reason] == 1 {
			noun = "line"
		}
		parts = append(parts, fmt.Sprintf("%s %s counted %s", count(float64(d[reason])), noun, reason))
	}
	return strings.Join(parts, ", ")
}

func (r *report) String() string {
	var b strings.Builder
	ready := 0
	for _, row := range r.rows {
		if row.readyOK {
			ready++
		}
	}
	fmt.Fprintf(&b, "Channel %s/%s: %d members, %d ready; rates and drops over the last %s\n\n",
		r.ns, r.channel, len(r.rows), ready, duration.HumanDuration(r.window))
	if len(r.rows) > 0 {
		tw := tabwriter.NewWriter(&b, 0, 8, 3, ' ', 0)
		_, _ = fmt.Fprintln(tw, "MEMBER\tREADY\tLINES IN/S\tLINES OUT/S\tQUEUE BYTES\tDROPS")
		for _, row := range r.rows {
			drops := "-"
			if len(row.drops) > 0 {
				parts := make([]string, 0, len(row.drops))
				for _, reason := range slices.Sorted(maps.Keys(row.drops)) {
					parts = append(parts, reason+"="+count(float64(row.drops[reason])))
				}
				drops = strings.Join(parts, ",")
			}
			if row.err != nil {
				drops = "?"
			}
			_, _ = fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", row.pod, row.ready, row.in, row.out, row.queue, drops)
		}
		_ = tw.Flush()
	}
	if len(r.links) > 0 {
		b.WriteString("\n")
		tw := tabwriter.NewWriter(&b, 0, 8, 3, ' ', 0)
		_, _ = fmt.Fprintln(tw, "FROM\tTO\tLINK\tSINCE\tUNACKED BYTES")
		for _, l := range r.links {
			_, _ = fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", l.from, l.to, l.state, l.since, l.unacked)
		}
		_ = tw.Flush()
	}
	b.WriteString("\n" + r.verdict + "\n")
	return b.String()
}

// counterDelta is a counter's increase, from 0 if it was reset (the sidecar restarted).
func counterDelta(cur, prev float64) int64 {
	if cur < prev {
		return int64(cur)
	}
	return int64(cur - prev)
}

func perSecond(delta, secs float64) string {
	if delta < 0 || secs <= 0 {
		return "?" // the sidecar restarted during the interval
	}
	return strconv.FormatFloat(delta/secs, 'f', 1, 64)
}

// count formats n with thousands separators: 1,203.
func count(n float64) string {
	s := strconv.FormatInt(int64(n), 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	if neg {
		s = "-" + s
	}
	return s
}
