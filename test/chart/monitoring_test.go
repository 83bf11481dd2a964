package chart_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
	"sigs.k8s.io/yaml"

	_ "github.com/podipc/podipc/pkg/inject" // registers the controller's webhook series
)

var monitoringValues = map[string]string{
	"metrics.dashboard.enabled":             "true",
	"metrics.dashboard.annotations":         `{"grafana_folder":"podipc"}`,
	"metrics.prometheusRule.enabled":        "true",
	"metrics.prometheusRule.labels":         `{"release":"prom"}`,
	"metrics.prometheusRule.dropsPerSecond": "0.5",
	"metrics.prometheusRule.unreachableFor": `"2m"`,
}

// targetLabels are the labels Prometheus adds to every scraped series of a PodMonitor or
// ServiceMonitor target: queries may use them though no scrape carries them.
var targetLabels = []string{"namespace", "pod", "container", "endpoint", "job", "instance", "service"}

func TestRenderDashboard(t *testing.T) {
	if render(t, nil).find("ConfigMap", "podipc-dashboard") != nil {
		t.Fatal("the dashboard ConfigMap renders by default")
	}
	objs := render(t, monitoringValues)
	cm := objs.get(t, "ConfigMap", "podipc-dashboard")
	if cm.GetLabels()["grafana_dashboard"] != "1" || cm.GetAnnotations()["grafana_folder"] != "podipc" {
		t.Errorf("dashboard ConfigMap labels %v annotations %v", cm.GetLabels(), cm.GetAnnotations())
	}
	data, _, _ := unstructured.NestedString(cm.Object, "data", "podipc-channel.json")
	file, err := os.ReadFile(filepath.Join(chartDir, "dashboards", "podipc-channel.json"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(data) != strings.TrimSpace(string(file)) {
		t.Error("the ConfigMap does not carry dashboards/podipc-channel.json as it is")
	}
	d := dashboard(t)
	if d.UID == "" || d.Title == "" || len(d.Panels) == 0 {
		t.Fatalf("dashboard uid %q title %q with %d panels", d.UID, d.Title, len(d.Panels))
	}
	// What the issue asks every channel to show, one panel each at least.
	for _, metric := range []string{"podipc_lines_in_total", "podipc_lines_out_total", "podipc_dropped_lines_total", "podipc_queue_bytes",
		"podipc_peer_link_unacked_bytes", "podipc_peer_links", "podipc_members", "podipc_webhook_injections_total"} {
		if !slices.ContainsFunc(d.exprs(), func(e string) bool { return slices.Contains(metricNames(e), metric) }) {
			t.Errorf("no panel queries %s", metric)
		}
	}
}

func TestRenderPrometheusRule(t *testing.T) {
	if render(t, nil).find("PrometheusRule", "podipc") != nil {
		t.Fatal("the PrometheusRule renders by default")
	}
	rule := render(t, monitoringValues).get(t, "PrometheusRule", "podipc")
	if rule.GetLabels()["release"] != "prom" {
		t.Errorf("PrometheusRule labels %v lack the extra label", rule.GetLabels())
	}
	rules := ruleList(t, rule)
	byName := map[string]map[string]any{}
	for _, r := range rules {
		byName[r["alert"].(string)] = r
	}
	drops, unreachable := byName["PodipcLinesDropped"], byName["PodipcMemberUnreachable"]
	if drops == nil || unreachable == nil {
		t.Fatalf("alerts %v", slices.Collect(func(yield func(string) bool) {
			for n := range byName {
				yield(n)
			}
		}))
	}
	if !strings.HasSuffix(drops["expr"].(string), "> 0.5") {
		t.Errorf("PodipcLinesDropped expr %q does not use dropsPerSecond", drops["expr"])
	}
	if unreachable["for"] != "2m" {
		t.Errorf("PodipcMemberUnreachable for %v, want unreachableFor", unreachable["for"])
	}
	checkRulesWithPromtool(t, rule)
}

// checkRulesWithPromtool runs `promtool check rules` on the rendered groups. promtool is
// not one of the pinned tools (it pulls in most of Prometheus): set PROMTOOL, or build it
// into bin/ with `make promtool`; without it this check is skipped with that message.
func checkRulesWithPromtool(t *testing.T, rule *unstructured.Unstructured) {
	promtool := os.Getenv("PROMTOOL")
	if promtool == "" {
		promtool = filepath.Join(repoRoot, "bin", "promtool")
	}
	if _, err := os.Stat(promtool); err != nil {
		t.Skipf("promtool check rules skipped: no %s (make promtool builds it)", promtool)
	}
	spec, _, _ := unstructured.NestedMap(rule.Object, "spec")
	b, err := yaml.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "rules.yaml")
	if err := os.WriteFile(file, b, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(t.Context(), promtool, "check", "rules", file).CombinedOutput()
	if err != nil {
		t.Fatalf("promtool check rules: %v\n%s", err, out)
	}
}

// TestDashboardAndAlertsQueryRealSeries: every metric and label the dashboard and the
// alerts query exists in a scrape of a real sidecar process (with a channel that has
// carried, delivered and dropped lines, and a peer link) and in the controller's
// registry, so renaming a series or a label fails here rather than leaving an empty
// panel or an alert that never fires.
func TestDashboardAndAlertsQueryRealSeries(t *testing.T) {
	have := sidecarSeries(t)
	mfs, err := ctrlmetrics.Registry.(prometheus.Gatherer).Gather()
	if err != nil {
		t.Fatal(err)
	}
	addFamilies(have, mfs)

	exprs := dashboard(t).exprs()
	for _, r := range ruleList(t, render(t, monitoringValues).get(t, "PrometheusRule", "podipc")) {
		exprs = append(exprs, r["expr"].(string))
	}
	for _, e := range exprs {
		names := metricNames(e)
		if len(names) == 0 {
			t.Errorf("query %q names no podipc metric", e)
		}
		labels := map[string]bool{}
		for _, n := range names {
			if have[n] == nil {
				t.Errorf("query %q reads %s, which no sidecar or controller exports", e, n)
				continue
			}
			for l := range have[n] {
				labels[l] = true
			}
		}
		for _, l := range labelNames(e) {
			if !labels[l] && !slices.Contains(targetLabels, l) {
				t.Errorf("query %q uses label %s, which none of %v carries", e, l, names)
			}
		}
	}
}

// sidecarSeries runs the sidecar binary with a static membership of itself and a member
// that never answers, makes it carry, deliver and drop a line, and returns the metric
// names of its /metrics with the label names each carries.
func sidecarSeries(t *testing.T) map[string]map[string]bool {
	bin := filepath.Join(t.TempDir(), "podipc-sidecar")
	if out, err := exec.CommandContext(t.Context(), "go", "build", "-o", bin, "../../cmd/podipc-sidecar").CombinedOutput(); err != nil {
		t.Fatalf("building the sidecar: %v\n%s", err, out)
	}
	peerPort, adminPort, linePort, deadPort := freePort(t), freePort(t), freePort(t), freePort(t)
	config := filepath.Join(t.TempDir(), "static.yaml")
	writeStatic := func(withPeer bool) {
		members := fmt.Sprintf(`[{namespace: demo, name: pod-a, uid: uid-a, ip: 127.0.0.1, peerPort: %d, ready: true, serving: true}`, peerPort)
		if withPeer {
			members += fmt.Sprintf(`, {namespace: demo, name: pod-b, uid: uid-b, ip: 127.0.0.1, peerPort: %d, ready: true, serving: true}`, deadPort)
		}
		body := fmt.Sprintf("channels:\n  orders: {localPort: %d, members: %s]}\n", linePort, members)
		if err := os.WriteFile(config+".tmp", []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(config+".tmp", config); err != nil {
			t.Fatal(err)
		}
	}
	writeStatic(true)
	cmd := exec.Command(bin, "--discovery=static", "--static-config="+config, "--app-address=127.0.0.1",
		"--peer-address=127.0.0.1:"+strconv.Itoa(peerPort), "--admin-address=127.0.0.1:"+strconv.Itoa(adminPort),
		"--socket-dir="+t.TempDir(), "--peer-tls=Disabled") // the test plays a plaintext peer
	cmd.Env = append(os.Environ(), "PODIPC_POD_NAME=pod-a", "PODIPC_POD_NAMESPACE=demo", "PODIPC_POD_UID=uid-a",
		"PODIPC_POD_IP=127.0.0.1", "PODIPC_CHANNELS=orders")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var log strings.Builder
	cmd.Stderr = &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("sidecar log:\n%s", log.String())
		}
	})
	metricsURL := "http://127.0.0.1:" + strconv.Itoa(adminPort) + "/metrics"
	scrape := func() map[string]map[string]bool {
		req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, metricsURL, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return nil
		}
		defer func() { _ = resp.Body.Close() }()
		b, _ := io.ReadAll(resp.Body)
		return parseExposition(t, b)
	}
	eventually(t, "the sidecar's admin port", func() bool { return scrape() != nil })

	// A reader and a writer on the channel: lines in, lines out.
	// The writer repeats its line until the reader gets one: a line sent before the
	// sidecar has attached the reader's connection has no receiver yet.
	reader := dialLine(t, linePort)
	writer := dialLine(t, linePort)
	br := bufio.NewReader(reader)
	eventually(t, "a line from the writer at the reader", func() bool {
		_, _ = writer.Write([]byte("hello\n"))
		_ = reader.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		line, err := br.ReadString('\n')
		return err == nil && line == "hello\n"
	})
	// pod-b never answers, so the line waits on its link; pod-b leaving drops it.
	writeStatic(false)
	eventually(t, "a line counted dropped", func() bool { return scrape()["podipc_dropped_lines_total"] != nil })
	have := scrape()
	// The per-peer link series exist only while pod-b is a member: read them before.
	writeStatic(true)
	eventually(t, "the link to pod-b reported", func() bool { return scrape()["podipc_peer_link_up"] != nil })
	for name, labels := range scrape() {
		have[name] = labels
	}
	return have
}

func dialLine(t *testing.T, port int) net.Conn {
	t.Helper()
	var c net.Conn
	eventually(t, "the line port", func() bool {
		var err error
		c, err = net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(port))
		return err == nil
	})
	t.Cleanup(func() { _ = c.Close() })
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	return c
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	return ln.Addr().(*net.TCPAddr).Port
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func parseExposition(t *testing.T, b []byte) map[string]map[string]bool {
	t.Helper()
	dec := expfmt.NewDecoder(strings.NewReader(string(b)), expfmt.NewFormat(expfmt.TypeTextPlain))
	have := map[string]map[string]bool{}
	for {
		var mf dto.MetricFamily
		if err := dec.Decode(&mf); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("parsing a scrape: %v", err)
		}
		addFamilies(have, []*dto.MetricFamily{&mf})
	}
	return have
}

// addFamilies records each family's name and the label names of its samples.
func addFamilies(have map[string]map[string]bool, mfs []*dto.MetricFamily) {
	for _, mf := range mfs {
		labels := have[mf.GetName()]
		if labels == nil {
			labels = map[string]bool{}
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				labels[lp.GetName()] = true
			}
		}
		if len(mf.GetMetric()) > 0 {
			have[mf.GetName()] = labels
		}
	}
}

// grafanaDashboard is the part of the dashboard model the tests read.
type grafanaDashboard struct {
	UID        string `json:"uid"`
	Title      string `json:"title"`
	Templating struct {
		List []struct {
			Query any `json:"query"`
		} `json:"list"`
	} `json:"templating"`
	Panels []struct {
		Type    string `json:"type"`
		Targets []struct {
			Expr string `json:"expr"`
		} `json:"targets"`
	} `json:"panels"`
}

func dashboard(t *testing.T) grafanaDashboard {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(chartDir, "dashboards", "podipc-channel.json"))
	if err != nil {
		t.Fatal(err)
	}
	var d grafanaDashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("the dashboard is not valid JSON: %v", err)
	}
	return d
}

// exprs returns every PromQL query of the dashboard: panel targets and the variables'
// label_values queries.
func (d grafanaDashboard) exprs() []string {
	var out []string
	for _, p := range d.Panels {
		for _, tg := range p.Targets {
			out = append(out, tg.Expr)
		}
	}
	for _, v := range d.Templating.List {
		if q, ok := v.Query.(map[string]any); ok {
			out = append(out, q["query"].(string))
		}
	}
	return out
}

func ruleList(t *testing.T, rule *unstructured.Unstructured) []map[string]any {
	t.Helper()
	groups, _, _ := unstructured.NestedSlice(rule.Object, "spec", "groups")
	var out []map[string]any
	for _, g := range groups {
		for _, r := range g.(map[string]any)["rules"].([]any) {
			out = append(out, r.(map[string]any))
		}
	}
	return out
}

var (
	metricRE  = regexp.MustCompile(`\bpodipc_[a-z_]+\b`)
	matcherRE = regexp.MustCompile(`([a-z_]+)\s*(=~|!=|!~|=)\s*"`)
	groupRE   = regexp.MustCompile(`\b(?:by|on|without|ignoring|group_left|group_right)\s*\(([^)]*)\)`)
	valuesRE  = regexp.MustCompile(`label_values\([^,]*,\s*([a-z_]+)\)`)
)

func metricNames(expr string) []string {
	return slices.Compact(slices.Sorted(slices.Values(metricRE.FindAllString(expr, -1))))
}

// labelNames are the labels a query matches on, groups by, joins on or lists values of.
func labelNames(expr string) []string {
	var out []string
	for _, m := range matcherRE.FindAllStringSubmatch(expr, -1) {
		out = append(out, m[1])
	}
	for _, m := range groupRE.FindAllStringSubmatch(expr, -1) {
		for _, l := range strings.Split(m[1], ",") {
			if l = strings.TrimSpace(l); l != "" {
				out = append(out, l)
			}
		}
	}
	for _, m := range valuesRE.FindAllStringSubmatch(expr, -1) {
		out = append(out, m[1])
	}
	return out
}
