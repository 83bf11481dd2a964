package sidecar_test

import (
	"strings"
	"testing"

	"github.com/podipc/podipc/pkg/sidecar"
)

// TestMemoryFlags: the memory limit comes from the webhook's env or the flag, the
// budget is half of it unless given, and a bad size is refused with a clear error.
func TestMemoryFlags(t *testing.T) {
	env := map[string]string{"PODIPC_POD_NAMESPACE": "demo", "PODIPC_POD_NAME": "p", "PODIPC_POD_UID": "u",
		"PODIPC_POD_IP": "127.0.0.1", "PODIPC_MEMORY_LIMIT": "50331648"}
	base := []string{"--discovery=static", "--static-config=x", "--peer-tls=Disabled"}
	parse := func(args ...string) (sidecar.Config, error) {
		return sidecar.ParseConfig(append(base, args...), func(k string) string { return env[k] })
	}
	c, err := parse()
	if err != nil {
		t.Fatal(err)
	}
	if c.MemoryLimit != 48<<20 || c.MemoryBudget != 24<<20 || c.SoftMemoryLimit() != 48<<20*9/10 {
		t.Errorf("from the env 48Mi: limit %d, budget %d, soft limit %d", c.MemoryLimit, c.MemoryBudget, c.SoftMemoryLimit())
	}
	if c, err = parse("--memory-limit=128Mi", "--memory-budget=16Mi"); err != nil || c.MemoryLimit != 128<<20 || c.MemoryBudget != 16<<20 {
		t.Errorf("flags: limit %d, budget %d, %v", c.MemoryLimit, c.MemoryBudget, err)
	}
	delete(env, "PODIPC_MEMORY_LIMIT")
	if c, err = parse(); err != nil || c.MemoryLimit != 0 || c.MemoryBudget != 0 {
		t.Errorf("no limit: want unbounded, got limit %d, budget %d, %v", c.MemoryLimit, c.MemoryBudget, err)
	}
	for _, bad := range [][]string{{"--memory-limit=lots"}, {"--memory-budget=-1Mi"}, {"--memory-budget=100Ki"},
		{"--memory-limit=32Mi", "--memory-budget=64Mi"}} {
		if _, err := parse(bad...); err == nil || !strings.Contains(err.Error(), "memory") {
			t.Errorf("%v: want an error naming the memory flag, got %v", bad, err)
		}
	}
}
