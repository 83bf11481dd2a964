package issuer_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/rand"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/internal/testenv"
)

// streamLines is the length of TestStreamAcrossRenewalAndRotation's stream (issue 13:
// "certificate renewal and root rotation in the middle of a 1,000,000-line stream").
const streamLines = 1_000_000

// TestStreamAcrossRenewalAndRotation streams 1,000,000 numbered lines from one real sidecar
// process's app to another's over a mutual-TLS peer link while the sidecars renew 6 s
// certificates and the identity root rotates (a 20 s root replaced 10 s before it
// expires). The stream pauses at nine tenths until both sidecars hold a certificate of the
// new root. The receiving app must see every line once, in order, on the connection it
// opened first; neither app connection closes, and neither sidecar redials its peer link
// (podipc_peer_reconnects_total does not move): a renewal or a new root changes only the next
// handshake.
func TestStreamAcrossRenewalAndRotation(t *testing.T) {
	if testing.Short() {
		t.Skip("rotates the identity root in real time for ~30 s")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "podipc-sidecar")
	if out, err := exec.CommandContext(t.Context(), "go", "build", "-o", bin, "github.com/podipc/podipc/cmd/podipc-sidecar").CombinedOutput(); err != nil {
		t.Fatalf("building the sidecar: %v\n%s", err, out)
	}
	kubeconfig, err := env.WriteKubeconfig(dir, "stream-sidecars")
	if err != nil {
		t.Fatal(err)
	}
	url, cm, kp := rotatingIssuer(t, "stream-identity")
	rootAtStart := kp.Signer().Cert.SerialNumber

	podA := member(t, nil)
	podB := podIn(t, podA.Namespace, "app", nil)
	ch := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Namespace: podA.Namespace, Name: "orders"},
		Spec: podipcv1alpha1.ChannelSpec{LocalPort: mtlsPort, Delivery: podipcv1alpha1.DeliveryBroadcast}}
	if err := env.Client.Create(t.Context(), ch); err != nil {
		t.Fatal(err)
	}
	refresh := "--trust-bundle-refresh=200ms" // well below the 2 s propagation delay
	a := startMTLSSidecarVia(t, bin, kubeconfig, dir, podA, "10.244.9.11", url, cm, refresh)
	b := startMTLSSidecarVia(t, bin, kubeconfig, dir, podB, "10.244.9.12", url, cm, refresh)
	publish(t, ch, podA, a)
	publish(t, ch, podB, b)

	appA := dialLinePort(t, a)
	// B serves the channel once its discovery has synced, which may be after A's: dial
	// until it listens (a single dial raced it and was refused).
	var appB net.Conn
	testenv.Eventually(t, "dialing B's line port", func() error {
		var d net.Dialer
		c, err := d.DialContext(t.Context(), "tcp", net.JoinHostPort(b.ip, strconv.Itoa(mtlsPort)))
		appB = c
		return err
	})
	t.Cleanup(func() { _ = appB.Close() })
	in := bufio.NewScanner(appB)
	// Probes until the link is up; the stream starts after the last probe B reads.
	testenv.Eventually(t, "the link from A to B is up", func() error {
		probe := "probe " + rand.String(6)
		appA.send(t, probe)
		_ = appB.SetReadDeadline(time.Now().Add(time.Second))
		for in.Scan() {
			if in.Text() == probe {
				return nil
			}
		}
		in = bufio.NewScanner(appB) // a deadline ends the scanner; the connection is still open
		return fmt.Errorf("B did not receive %q", probe)
	})
	_ = appB.SetReadDeadline(time.Time{})
	// Redials before the stream (a link refused while the peer's discovery synced) are
	// not what this test is about: it counts those during the stream.
	expiryAtStart, reconnectsAtStart := map[*mtlsSidecar]float64{}, map[*mtlsSidecar]float64{}
	for _, sc := range []*mtlsSidecar{a, b} {
		v, err := sc.metric("podipc_identity_certificate_expiry_timestamp_seconds")
		if err != nil {
			t.Fatal(err)
		}
		expiryAtStart[sc] = v
		if reconnectsAtStart[sc], err = sc.metric("podipc_peer_reconnects_total"); err != nil {
			t.Fatal(err)
		}
	}

	// The receiving app: every line once, in order.
	type result struct {
		received int
		err      error
	}
	got := make(chan result, 1)
	go func() {
		next := 0
		for in.Scan() {
			line := in.Text()
			if len(line) > 6 && line[:6] == "probe " {
				continue // a probe that arrived late
			}
			n, err := strconv.Atoi(line)
			switch {
			case err != nil:
				got <- result{next, fmt.Errorf("line %q after %d lines", line, next)}
				return
			case n > next:
				got <- result{next, fmt.Errorf("lines %d to %d lost", next, n-1)}
				return
			case n < next:
				got <- result{next, fmt.Errorf("line %d again (duplicated or out of order) after %d", n, next-1)}
				return
			}
			if next++; next == streamLines {
				got <- result{next, nil}
				return
			}
		}
		got <- result{next, fmt.Errorf("the app connection to B ended after %d lines: %w", next, in.Err())}
	}()

	// Renewal and rotation are done once both sidecars hold a certificate issued after the
	// root changed (its expiry is past the change plus the lifetime).
	var rotated atomic.Bool
	var rotatedAt time.Time
	watch, stopWatch := context.WithCancel(t.Context())
	defer stopWatch()
	var wg sync.WaitGroup
	wg.Go(func() {
		for tick := time.NewTicker(100 * time.Millisecond); ; {
			select {
			case <-watch.Done():
				return
			case <-tick.C:
			}
			if rotatedAt.IsZero() {
				if kp.Signer().Cert.SerialNumber.Cmp(rootAtStart) != 0 {
					rotatedAt = time.Now()
				}
				continue
			}
			done := true
			for _, sc := range []*mtlsSidecar{a, b} {
				v, err := sc.metric("podipc_identity_certificate_expiry_timestamp_seconds")
				done = done && err == nil && v > expiryAtStart[sc] && int64(v) >= rotatedAt.Add(rotatingLifetime).Unix()
			}
			if done {
				rotated.Store(true)
				return
			}
		}
	})

	_ = appA.conn.SetWriteDeadline(time.Time{}) // the probes' send set one
	out := bufio.NewWriterSize(appA.conn, 64<<10)
	buf := make([]byte, 0, 16)
	for i := 0; i < streamLines; i++ {
		buf = strconv.AppendInt(buf[:0], int64(i), 10)
		buf = append(buf, '\n')
		if _, err := out.Write(buf); err != nil {
			t.Fatalf("A's app writing line %d: %v (the app connection ended)", i, err)
		}
		if i%1000 != 999 {
			continue
		}
		if err := out.Flush(); err != nil {
			t.Fatalf("A's app writing line %d: %v (the app connection ended)", i, err)
		}
		if !rotated.Load() {
			// Spread the stream over the renewals and the rotation; hold it at nine tenths
			// until both are done.
			time.Sleep(20 * time.Millisecond)
			for deadline := time.Now().Add(time.Minute); i >= streamLines*9/10 && !rotated.Load(); {
				if time.Now().After(deadline) {
					t.Fatal("the sidecars did not both hold a certificate of a new root within a minute")
				}
				select {
				case r := <-got:
					t.Fatalf("the stream broke while waiting for the rotation: %v", r.err)
				case <-time.After(100 * time.Millisecond):
				}
			}
		}
	}
	if err := out.Flush(); err != nil {
		t.Fatal(err)
	}
	var r result
	select {
	case r = <-got:
	case <-time.After(2 * time.Minute):
		t.Fatal("B's app did not receive the stream within 2 min")
	}
	stopWatch()
	wg.Wait()
	if r.err != nil {
		t.Fatalf("B's app received %d lines in order, then: %v", r.received, r.err)
	}
	if !rotated.Load() {
		t.Fatal("the stream ended before both sidecars held a certificate of the new root")
	}
	for _, sc := range []*mtlsSidecar{a, b} {
		v, err := sc.metric("podipc_peer_reconnects_total")
		if err != nil {
			t.Fatal(err)
		}
		if v != reconnectsAtStart[sc] {
			t.Errorf("the sidecar of %s redialled its peer link %v times during the stream", sc.pod.Name, v-reconnectsAtStart[sc])
		}
	}
	// The link still works both ways after the stream (B's app connection is its first).
	line := "after " + rand.String(6)
	if _, err := fmt.Fprintln(appB, line); err != nil {
		t.Fatal(err)
	}
	if !appA.receives(line, 10*time.Second) {
		t.Fatal("A did not receive B's line after the stream")
	}
}
