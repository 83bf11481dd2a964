package sidecar_test

import (
	"runtime"
	"strings"
	"testing"

	"github.com/podipc/podipc/pkg/sidecar"
)

// TestMaxProcsFlag: --max-procs defaults to the webhook's $PODIPC_MAX_PROCS, else 1; the
// flag wins over the env; anything but a whole number ≥ 0 is refused with an error that
// names the flag.
func TestMaxProcsFlag(t *testing.T) {
	env := map[string]string{"PODIPC_POD_NAMESPACE": "demo", "PODIPC_POD_NAME": "p", "PODIPC_POD_UID": "u",
		"PODIPC_POD_IP": "127.0.0.1"}
	base := []string{"--discovery=static", "--static-config=x", "--peer-tls=Disabled"}
	parse := func(args ...string) (sidecar.Config, error) {
		return sidecar.ParseConfig(append(base, args...), func(k string) string { return env[k] })
	}
	if c, err := parse(); err != nil || c.MaxProcs != sidecar.DefaultMaxProcs || sidecar.DefaultMaxProcs != 1 {
		t.Errorf("no flag, no env: MaxProcs %d, %v; want 1", c.MaxProcs, err)
	}
	env[sidecar.EnvMaxProcs] = "3"
	if c, err := parse(); err != nil || c.MaxProcs != 3 {
		t.Errorf("$PODIPC_MAX_PROCS=3: MaxProcs %d, %v", c.MaxProcs, err)
	}
	if c, err := parse("--max-procs=0"); err != nil || c.MaxProcs != 0 {
		t.Errorf("--max-procs=0 over the env: MaxProcs %d, %v", c.MaxProcs, err)
	}
	for _, bad := range [][]string{{"--max-procs=-1"}, {"--max-procs=two"}, {"--max-procs=1.5"}} {
		if _, err := parse(bad...); err == nil || !strings.Contains(err.Error(), "--max-procs") {
			t.Errorf("%v: want an error naming --max-procs, got %v", bad, err)
		}
	}
	env[sidecar.EnvMaxProcs] = "lots"
	if _, err := parse(); err == nil || !strings.Contains(err.Error(), sidecar.EnvMaxProcs) {
		t.Errorf("$PODIPC_MAX_PROCS=lots: want an error naming it, got %v", err)
	}
}

// TestSidecarRunsOnMaxProcs: the running sidecar's GOMAXPROCS, as its own /metrics reports
// it (go_sched_gomaxprocs_threads), is 1 by default, what --max-procs says, the runtime's
// own choice (every CPU here, no CPU limit) with 0, and $GOMAXPROCS when that is set.
func TestSidecarRunsOnMaxProcs(t *testing.T) {
	c := prepareCluster(t, 4, chanCfg{name: "orders", policy: "Block"})
	c.pods[1].args = []string{"--max-procs=2"}
	c.pods[2].args = []string{"--max-procs=0"}
	c.pods[3].args = []string{"--max-procs=1"}
	c.pods[3].env = []string{"GOMAXPROCS=2"}
	c.startAll()
	want := []float64{1, 2, float64(runtime.NumCPU()), 2}
	for i, p := range c.pods {
		if got := c.metric(p, "go_sched_gomaxprocs_threads"); got != want[i] {
			t.Errorf("%s (args %v, env %v): GOMAXPROCS %v, want %v", p.name, p.args, p.env, got, want[i])
		}
	}
}
