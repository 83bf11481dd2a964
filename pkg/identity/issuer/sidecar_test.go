package issuer_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/podipc/podipc/internal/testenv"
	"github.com/podipc/podipc/pkg/identity"
)

// TestSidecarProcess runs the real podipc-sidecar binary in Kubernetes mode, configured as
// the webhook configures it (identity URL, trust domain, trust bundle ConfigMap, a
// projected identity token), and checks through its /metrics that it holds a workload
// certificate and renews it (the endpoint issues 20 s certificates here).
func TestSidecarProcess(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "podipc-sidecar")
	if out, err := exec.CommandContext(t.Context(), "go", "build", "-o", bin, "github.com/podipc/podipc/cmd/podipc-sidecar").CombinedOutput(); err != nil {
		t.Fatalf("building the sidecar: %v\n%s", err, out)
	}
	kubeconfig, err := env.WriteKubeconfig(dir, "sidecar")
	if err != nil {
		t.Fatal(err)
	}
	pod := member(t, nil)
	tokenFile := filepath.Join(dir, "identity-token")
	if err := os.WriteFile(tokenFile, []byte(tokenFor(t, pod, identity.Audience)), 0o600); err != nil {
		t.Fatal(err)
	}
	admin := freePort(t)
	cmd := exec.Command(bin, "--discovery=kubernetes", "--kubeconfig="+kubeconfig,
		"--peer-address=127.0.0.1:"+strconv.Itoa(freePort(t)), "--admin-address=127.0.0.1:"+strconv.Itoa(admin),
		"--app-address=127.0.0.1", "--socket-dir="+dir, "--drain-timeout=1s", "--identity-token-file="+tokenFile)
	cmd.Env = append(os.Environ(), "PODIPC_POD_NAMESPACE="+pod.Namespace, "PODIPC_POD_NAME="+pod.Name,
		"PODIPC_POD_UID="+string(pod.UID), "PODIPC_POD_IP=127.0.0.1", "PODIPC_CHANNELS=orders",
		"PODIPC_IDENTITY_URL="+endpoint, "PODIPC_TRUST_DOMAIN="+trustDomain,
		"PODIPC_TRUST_BUNDLE="+trustCM.Namespace+"/"+trustCM.Name)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	logf, err := os.Create(filepath.Join(dir, "sidecar.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
		_ = logf.Close()
		if t.Failed() {
			out, _ := os.ReadFile(logf.Name())
			t.Logf("sidecar log:\n%s", out)
		}
	})

	expiry := func() (float64, error) {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/metrics", admin), nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, err
		}
		defer func() { _ = resp.Body.Close() }()
		return metricValue(resp.Body, "podipc_identity_certificate_expiry_timestamp_seconds")
	}
	var first float64
	testenv.Eventually(t, "the sidecar holds a certificate", func() error {
		v, err := expiry()
		if err != nil {
			return err
		}
		if v == 0 {
			return fmt.Errorf("expiry metric is 0: no certificate yet")
		}
		first = v
		return nil
	})
	if at := time.Unix(int64(first), 0); time.Until(at) > 25*time.Second || time.Until(at) < -time.Minute {
		t.Fatalf("certificate expires at %s, want about 20 s from now", at)
	}
	testenv.Eventually(t, "the sidecar renews its certificate", func() error {
		v, err := expiry()
		if err != nil {
			return err
		}
		if v <= first {
			return fmt.Errorf("expiry still %v", v)
		}
		return nil
	})
}

// metricValue returns the value of an unlabelled metric in a Prometheus text exposition.
func metricValue(r io.Reader, name string) (float64, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			return strconv.ParseFloat(strings.TrimSpace(v), 64)
		}
	}
	return 0, fmt.Errorf("no %s in /metrics", name)
}

func freePort(t *testing.T) int {
	t.Helper()
	var lc net.ListenConfig
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	return ln.Addr().(*net.TCPAddr).Port
}
