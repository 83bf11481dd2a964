package sidecar_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/podipc/podipc/internal/pki"
	"github.com/podipc/podipc/pkg/peer"
	"github.com/podipc/podipc/pkg/peertls"
)

// TestMTLSLines: three sidecars requiring mutual TLS carry every line of every pod to
// every other, and report their certificate's expiry.
func TestMTLSLines(t *testing.T) {
	c := newMTLSCluster(t, 3, chanCfg{name: "orders", policy: "Block"})
	apps := make([]*app, len(c.pods))
	for i, p := range c.pods {
		apps[i] = c.dialApp(p, 0, false)
	}
	for _, p := range c.pods {
		c.waitConns(p, "orders", 1)
	}
	n := 20_000 / scale
	for i, a := range apps {
		a.send(t, fmt.Sprintf("%c", 'a'+i), 0, n)
	}
	for i, a := range apps {
		eventually(t, "every line at "+c.pods[i].name, func() bool { return a.count() >= 2*n })
	}
	time.Sleep(100 * time.Millisecond)
	for i, a := range apps {
		byPrefix := map[string][]string{}
		for _, l := range a.lines() {
			byPrefix[l[:1]] = append(byPrefix[l[:1]], l)
		}
		for j := range apps {
			if j != i {
				pre := fmt.Sprintf("%c", 'a'+j)
				checkSeq(t, c.pods[i].name+" from "+c.pods[j].name, byPrefix[pre], pre, 0, n)
			}
		}
	}
	for _, p := range c.pods {
		if got := c.metric(p, "podipc_peer_certificate_expiry_timestamp_seconds"); got < float64(time.Now().Unix()) {
			t.Fatalf("%s reports certificate expiry %v, want a time in the future", p.name, got)
		}
		if got := c.metric(p, `podipc_peer_plaintext_links_total{direction="in"}`); got != 0 {
			t.Fatalf("%s admitted %v plaintext links under Required", p.name, got)
		}
	}
}

// attacker is a connection to a sidecar's peer port made by the test, from a chosen
// source address, as an impostor would.
type attacker struct {
	from string
	// cert, if not nil, is presented in a TLS handshake; tls without cert runs TLS
	// presenting none.
	cert *tls.Certificate
	tls  bool
}

// hello dials to's peer port, runs TLS if asked, sends HELLO claiming id and returns
// the REFUSE reason, or the error that ended the exchange; welcome says WELCOME came.
func (at attacker) hello(t *testing.T, to *pod, id peer.Identity) (reason string, welcome bool, err error) {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(at.from)}, Timeout: 5 * time.Second}
	raw, err := d.Dial("tcp", net.JoinHostPort(to.ip, "7701"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = raw.Close() }()
	_ = raw.SetDeadline(time.Now().Add(30 * time.Second))
	conn := raw
	if at.tls || at.cert != nil {
		cfg := &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true} //nolint:gosec // the attacker trusts anyone
		if at.cert != nil {
			cfg.Certificates = []tls.Certificate{*at.cert}
		}
		tc := tls.Client(raw, cfg)
		if err := tc.Handshake(); err != nil {
			return "", false, err
		}
		conn = tc
	}
	h := peer.Hello{MinVersion: peer.MinVersion, MaxVersion: peer.Version, Pod: id, Channels: []string{"orders"}}
	if _, err := conn.Write(h.Frame()); err != nil {
		return "", false, err
	}
	typ, body, err := peer.NewReader(conn, 1<<16).Next()
	if err != nil {
		return "", false, err
	}
	if typ == peer.FrameWelcome {
		return "", true, nil
	}
	if typ != peer.FrameRefuse {
		t.Fatalf("got frame type %d, want REFUSE", typ)
	}
	reason, _ = peer.ParseReason(body)
	return reason, false, nil
}

// issue returns a certificate for pod from ca, valid from notBefore to notAfter.
func issue(t *testing.T, ca *pki.CA, pod peertls.Pod, notBefore, notAfter time.Time) *tls.Certificate {
	t.Helper()
	certPEM, keyPEM, err := ca.Issue(pod, notBefore, notAfter)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return &cert
}

// TestMTLSImpostors: links to a receiver requiring mutual TLS, from the source IP of a
// member and with that member's HELLO, are refused — counted by reason and logged —
// without a certificate (plaintext, or TLS presenting none), with a certificate of
// another pod, from another root, or expired; the member's own link streams on
// untouched.
func TestMTLSImpostors(t *testing.T) {
	c := newMTLSCluster(t, 2, chanCfg{name: "orders", policy: "Block"})
	a, b := c.pods[0], c.pods[1]
	sender := c.dialApp(b, 0, false)
	r := c.dialApp(a, 0, false)
	c.waitConns(a, "orders", 1)
	// The honest member streams while the impostors try. Its first dials may have
	// failed while a was starting: only redials from now on count.
	redials := c.metric(b, "podipc_peer_reconnects_total")
	n := 200_000 / scale
	stop := make(chan struct{})
	streamed := make(chan error, 1)
	go func() { streamed <- pacedWrite(sender, "h", n, time.Millisecond, stop) }()
	now := time.Now()
	other, err := pki.NewCA("another root")
	if err != nil {
		t.Fatal(err)
	}
	claimB := peer.Identity{Namespace: "demo", Name: b.name, UID: b.uid, Incarnation: 42}
	cases := []struct {
		name, label, logged string
		at                  attacker
	}{
		{"plaintext", peertls.ReasonPlaintext, "requires mutual TLS", attacker{from: b.ip}},
		{"TLS without a certificate", peertls.ReasonNoCertificate, "presented no certificate", attacker{from: b.ip, tls: true}},
		{"certificate of another pod", peertls.ReasonIdentity, "certificate names pod UID " + a.uid + " in namespace demo",
			attacker{from: b.ip, cert: issue(t, c.ca, a.identity(), now.Add(-time.Hour), now.Add(time.Hour))}},
		{"certificate from another root", peertls.ReasonUntrusted, "certificate signed by unknown authority",
			attacker{from: b.ip, cert: issue(t, other, b.identity(), now.Add(-time.Hour), now.Add(time.Hour))}},
		{"expired certificate", peertls.ReasonExpired, "certificate has expired",
			attacker{from: b.ip, cert: issue(t, c.ca, b.identity(), now.Add(-2*time.Hour), now.Add(-time.Hour))}},
	}
	refused := func(label string) float64 {
		return c.metric(a, fmt.Sprintf(`podipc_peer_refused_total{reason=%q}`, label))
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := refused(tc.label)
			reason, welcome, err := tc.at.hello(t, a, claimB)
			if welcome {
				t.Fatal("the impostor was welcomed")
			}
			t.Logf("refused: reason %q, err %v", reason, err)
			eventually(t, "the refusal counted under "+tc.label, func() bool { return refused(tc.label) == before+1 })
			eventually(t, "the refusal logged", func() bool {
				return a.logged(`"msg":"Refused peer link"`) && a.logged(tc.logged)
			})
		})
	}
	close(stop)
	if err := <-streamed; err != nil {
		t.Fatal(err)
	}
	eventually(t, "every honest line", func() bool { return r.count() >= n })
	time.Sleep(100 * time.Millisecond)
	checkSeq(t, "receiver", r.lines(), "h", 0, n)
	if got := c.metric(b, "podipc_peer_reconnects_total") - redials; got != 0 {
		t.Fatalf("the honest link was redialled %v times while impostors tried", got)
	}
}

// pacedWrite sends n lines "<prefix><i>" in 1000 chunks, pausing for pause between
// chunks until stop is closed (so that the stream lasts as long as the test needs it),
// and at 90% of n until then.
func pacedWrite(a *app, prefix string, n int, pause time.Duration, stop <-chan struct{}) error {
	chunk := max(n/1000, 1)
	hold := n * 9 / 10
	for i := 0; i < n; i += chunk {
		if i >= hold {
			<-stop
		}
		if err := a.write(prefix, i, min(i+chunk, n)); err != nil {
			return err
		}
		select {
		case <-stop:
		case <-time.After(pause):
		}
	}
	return nil
}

// TestMTLSReceiverImpostor: a sender requiring mutual TLS dials a member's address,
// where an impostor listens with a certificate from another root, one of another pod,
// or an expired one. The sender abandons each (counted by reason, logged) and hands it
// no line; once the real member starts there, it gets every line, once.
func TestMTLSReceiverImpostor(t *testing.T) {
	c := prepareCluster(t, 2, chanCfg{name: "orders", policy: "Block"})
	c.enableTLS()
	a, b := c.pods[0], c.pods[1]
	c.start(a)
	c.waitReady(a)
	sender := c.dialApp(a, 0, false)
	n := 1000
	sender.send(t, "q", 0, n)
	now := time.Now()
	other, err := pki.NewCA("another root")
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, label, logged string
		cert                *tls.Certificate
	}{
		{"certificate from another root", peertls.ReasonUntrusted, "certificate signed by unknown authority",
			issue(t, other, b.identity(), now.Add(-time.Hour), now.Add(time.Hour))},
		{"certificate of another pod", peertls.ReasonIdentity, "certificate names pod UID " + a.uid + " in namespace demo",
			issue(t, c.ca, a.identity(), now.Add(-time.Hour), now.Add(time.Hour))},
		{"expired certificate", peertls.ReasonExpired, "certificate has expired",
			issue(t, c.ca, b.identity(), now.Add(-2*time.Hour), now.Add(-time.Hour))},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			series := fmt.Sprintf(`podipc_peer_outbound_refused_total{reason=%q}`, tc.label)
			before := c.metric(a, series)
			ln, err := net.Listen("tcp", net.JoinHostPort(b.ip, "7701"))
			if err != nil {
				t.Fatal(err)
			}
			var mu sync.Mutex
			var leaked bytes.Buffer
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					conn, err := ln.Accept()
					if err != nil {
						return
					}
					wg.Add(1)
					go func() {
						defer wg.Done()
						defer func() { _ = conn.Close() }()
						_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
						srv := tls.Server(conn, &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{*tc.cert},
							ClientAuth: tls.RequestClientCert})
						got, _ := io.ReadAll(srv)
						mu.Lock()
						leaked.Write(got)
						mu.Unlock()
					}()
				}
			}()
			stopped := false
			stop := func() {
				if !stopped {
					stopped = true
					_ = ln.Close()
					wg.Wait()
				}
			}
			defer stop()
			leakedLen := func() int {
				mu.Lock()
				defer mu.Unlock()
				return leaked.Len()
			}
			eventually(t, "the sender to refuse the impostor", func() bool { return c.metric(a, series) > before || leakedLen() > 0 })
			stop()
			if leakedLen() > 0 {
				t.Fatalf("the impostor read %d bytes of the protocol", leakedLen())
			}
			eventually(t, "the refusal logged", func() bool {
				return a.logged(`"msg":"Refused peer: its certificate failed verification"`) && a.logged(tc.logged)
			})
		})
	}
	c.start(b)
	c.waitReady(b)
	r := c.dialApp(b, 0, false)
	c.waitConns(b, "orders", 1)
	c.waitLinks()
	// Lines queued while b had no app are delivered then or counted no_connection.
	sender.send(t, "q", n, 2*n)
	eventually(t, "the lines after b's app connected", func() bool { return r.count() >= 1 && r.lines()[r.count()-1] == fmt.Sprintf("q%08d", 2*n-1) })
	got := r.lines()
	first := seqOf(t, got[0], "q")
	noConn := int(c.metric(b, `podipc_dropped_lines_total{channel="orders",reason="no_connection"}`))
	if first != noConn {
		t.Fatalf("b's app got lines from q%08d on, but %d were counted no_connection", first, noConn)
	}
	checkSeq(t, "b's app", got, "q", first, 2*n)
}

// TestMTLSRotation: in the middle of a long stream the certificates are renewed, then
// the root rotated (bundle of old and new roots, leaves from the new root, bundle of
// the new root alone), each by rewriting the sidecars' files. No link is dropped by it,
// every line arrives once and in order, and links redialled afterwards handshake with
// the new root alone, which no longer admits a certificate of the old one.
func TestMTLSRotation(t *testing.T) {
	c := newMTLSCluster(t, 2, chanCfg{name: "orders", policy: "Block"})
	a, b := c.pods[0], c.pods[1]
	sender := c.dialApp(a, 0, false)
	r := c.dialApp(b, 0, false)
	c.waitConns(b, "orders", 1)
	n := 1_000_000 / scale
	stop := make(chan struct{})
	streamed := make(chan error, 1)
	go func() { streamed <- pacedWrite(sender, "s", n, 8*time.Millisecond, stop) }()
	expiry := func(p *pod) float64 { return c.metric(p, "podipc_peer_certificate_expiry_timestamp_seconds") }
	reloads := func(p *pod) int {
		p.logMu.Lock()
		defer p.logMu.Unlock()
		return strings.Count(p.log.String(), "Reloaded the peer certificate and trust bundle")
	}
	// rewrite writes new files for every pod (nil leaves a file as it is) and waits
	// until each sidecar has loaded them.
	rewrite := func(what string, ca *pki.CA, notAfter time.Time, bundle []byte) {
		t.Helper()
		for _, p := range c.pods {
			before := reloads(p)
			var certPEM, keyPEM []byte
			if ca != nil {
				var err error
				if certPEM, keyPEM, err = ca.Issue(p.identity(), time.Now().Add(-time.Minute), notAfter); err != nil {
					t.Fatal(err)
				}
			}
			if err := p.files.Write(certPEM, keyPEM, bundle); err != nil {
				t.Fatal(err)
			}
			eventually(t, what+" loaded by "+p.name, func() bool { return reloads(p) > before })
			if ca != nil && expiry(p) != float64(notAfter.Unix()) {
				t.Fatalf("%s: %s reports expiry %v, want %v", what, p.name, expiry(p), notAfter.Unix())
			}
		}
		t.Logf("%s: done with %d lines received", what, r.count())
	}
	eventually(t, "the stream to start", func() bool { return r.count() > 0 })
	reconnects := c.metric(a, "podipc_peer_reconnects_total")
	// Renewal: new leaves from the same root.
	rewrite("renewal", c.ca, time.Now().Add(48*time.Hour).Truncate(time.Second), nil)
	// Root rotation: first trust both, then issue from the new root, then drop the old.
	newCA, err := pki.NewCA("podipc test root 2")
	if err != nil {
		t.Fatal(err)
	}
	rewrite("bundle of both roots", nil, time.Time{}, append(append([]byte(nil), c.ca.PEM...), newCA.PEM...))
	rewrite("leaves from the new root", newCA, time.Now().Add(72*time.Hour).Truncate(time.Second), nil)
	rewrite("bundle of the new root", nil, time.Time{}, newCA.PEM)
	if got := c.metric(a, "podipc_peer_reconnects_total"); got != reconnects {
		t.Fatalf("renewal and rotation dropped the link: %v redials, want %v", got, reconnects)
	}
	// New handshakes now need the new root on both ends.
	c.post(a, "/debug/reset-peers")
	eventually(t, "the link redialled", func() bool { return c.metric(a, "podipc_peer_reconnects_total") > reconnects })
	c.waitLinks()
	old := attacker{from: a.ip, cert: issue(t, c.ca, a.identity(), time.Now().Add(-time.Hour), time.Now().Add(time.Hour))}
	before := c.metric(b, `podipc_peer_refused_total{reason="untrusted"}`)
	if _, welcome, _ := old.hello(t, b, peer.Identity{Namespace: "demo", Name: a.name, UID: a.uid, Incarnation: 7}); welcome {
		t.Fatal("a certificate of the old root was admitted after the rotation")
	}
	eventually(t, "the old root's certificate refused", func() bool {
		return c.metric(b, `podipc_peer_refused_total{reason="untrusted"}`) == before+1
	})
	close(stop)
	if err := <-streamed; err != nil {
		t.Fatal(err)
	}
	eventually(t, "every line", func() bool { return r.count() >= n })
	time.Sleep(200 * time.Millisecond)
	checkSeq(t, "receiver", r.lines(), "s", 0, n)
	select {
	case <-r.done:
		t.Fatalf("the receiving app's connection ended: %v", r.err)
	case <-sender.done:
		t.Fatalf("the sending app's connection ended: %v", sender.err)
	default:
	}
}

// TestMTLSPermissive: a sidecar in Permissive mode and an older, plaintext-only one
// (played by --peer-tls=Disabled) exchange lines both ways, each plaintext link counted
// by the permissive side; a bad certificate is still refused there.
func TestMTLSPermissive(t *testing.T) {
	c := prepareCluster(t, 2, chanCfg{name: "orders", policy: "Block"})
	c.enableTLS()
	a, b := c.pods[0], c.pods[1]
	a.args = []string{"--peer-tls=Permissive"}
	b.args = []string{"--peer-tls=Disabled"}
	c.startAll()
	c.waitLinks()
	ta, tb := c.dialApp(a, 0, false), c.dialApp(b, 0, false)
	c.waitConns(a, "orders", 1)
	c.waitConns(b, "orders", 1)
	n := 10_000 / scale
	ta.send(t, "a", 0, n)
	tb.send(t, "b", 0, n)
	eventually(t, "lines at a", func() bool { return ta.count() >= n })
	eventually(t, "lines at b", func() bool { return tb.count() >= n })
	checkSeq(t, "a", ta.lines(), "b", 0, n)
	checkSeq(t, "b", tb.lines(), "a", 0, n)
	for _, dir := range []string{"in", "out"} {
		if got := c.metric(a, fmt.Sprintf(`podipc_peer_plaintext_links_total{direction=%q}`, dir)); got < 1 {
			t.Fatalf("podipc_peer_plaintext_links_total{direction=%q} = %v, want at least 1", dir, got)
		}
	}
	if !a.logged("Accepting a plaintext peer link") || !a.logged("Peer does not speak TLS: dialled in plaintext") {
		t.Fatal("the plaintext links were not logged")
	}
	other, err := pki.NewCA("another root")
	if err != nil {
		t.Fatal(err)
	}
	at := attacker{from: b.ip, cert: issue(t, other, b.identity(), time.Now().Add(-time.Hour), time.Now().Add(time.Hour))}
	before := c.metric(a, `podipc_peer_refused_total{reason="untrusted"}`)
	if _, welcome, _ := at.hello(t, a, peer.Identity{Namespace: "demo", Name: b.name, UID: b.uid, Incarnation: 9}); welcome {
		t.Fatal("Permissive admitted a certificate of another root")
	}
	eventually(t, "the bad certificate refused", func() bool {
		return c.metric(a, `podipc_peer_refused_total{reason="untrusted"}`) == before+1
	})
}

// TestPeerTLSConfig: the sidecar refuses to start, with a clear error, in static mode
// without certificates unless plaintext is asked for, with Required or Permissive and
// no certificate, with only some of the files, with files that do not load, with
// another pod's certificate, and with two certificate sources (files and identity).
func TestPeerTLSConfig(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "static.yaml")
	if err := os.WriteFile(cfg, []byte("channels: {}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ca, err := pki.NewCA("root")
	if err != nil {
		t.Fatal(err)
	}
	other, err := ca.WriteFiles(dir, peertls.Pod{Namespace: "demo", Name: "q", UID: "u2"}, ca.PEM)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "peer links require mutual TLS by default: set --tls-cert, --tls-key and --tls-ca, or --peer-tls=Disabled"},
		{[]string{"--peer-tls=Required"}, "--peer-tls=Required needs a certificate"},
		{[]string{"--peer-tls=Permissive"}, "--peer-tls=Permissive needs a certificate"},
		{[]string{"--peer-tls=Sometimes"}, `--peer-tls="Sometimes": want Required, Permissive or Disabled`},
		{[]string{"--tls-cert=" + cfg}, "--tls-cert, --tls-key and --tls-ca go together"},
		{[]string{"--tls-cert=" + cfg, "--tls-key=" + cfg, "--tls-ca=" + cfg}, "--tls-cert " + cfg},
		{other.Args(), "is not this pod's: certificate names pod UID u2 in namespace demo, expected demo/p (UID u)"},
		{append([]string{"--discovery=kubernetes", "--identity-url=https://127.0.0.1:1", "--trust-domain=td", "--trust-bundle=a/b"}, other.Args()...),
			"--tls-cert, --tls-key and --tls-ca and --identity-url are two certificate sources for peer links: set one"},
	} {
		// A sidecar that starts anyway is killed after a while, and the test fails.
		ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, sidecarBin, append([]string{"--discovery=static", "--static-config=" + cfg,
			"--peer-address=127.0.0.1:0", "--admin-address=127.0.0.1:0"}, tc.args...)...)
		cmd.Env = append(os.Environ(), "PODIPC_POD_NAME=p", "PODIPC_POD_NAMESPACE=demo", "PODIPC_POD_UID=u")
		out, err := cmd.CombinedOutput()
		var exit *exec.ExitError
		if !errors.As(err, &exit) {
			t.Fatalf("%v: the sidecar did not fail: %v\n%s", tc.args, err, out)
		}
		if !strings.Contains(string(out), tc.want) {
			t.Fatalf("%v: error %q does not say %q", tc.args, out, tc.want)
		}
	}
}
