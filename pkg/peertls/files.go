package peertls

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/go-logr/logr"
)

// Files is a Source read from PEM files: a certificate chain, its key and a trust
// bundle (static mode, tests, the demo). Start re-reads them every PollInterval and
// swaps in a new certificate or bundle once it loads: new handshakes use it, links up
// are left alone. Files that are being rewritten (a certificate that does not match
// its key yet) keep the current material in force until they load.
type Files struct {
	CertFile, KeyFile, CAFile string
	// Pod, if its UID is set, is the pod the certificate must name (Verify): files
	// of another pod's certificate are refused at Load and not swapped in on reload.
	Pod Pod
	Log logr.Logger
	// PollInterval is how often the files are read (default one second).
	PollInterval time.Duration

	mu    sync.RWMutex
	cert  *tls.Certificate
	roots *x509.CertPool
	// seen is the content last loaded or last found broken, so that a file is parsed
	// (and a broken one logged) once per change.
	seen []byte
}

// Load reads the files once; an error names the file at fault.
func (f *Files) Load() error {
	raw, err := f.read()
	if err != nil {
		return err
	}
	return f.load(raw)
}

// Start re-reads the files until ctx ends.
func (f *Files) Start(ctx context.Context) error {
	every := f.PollInterval
	if every <= 0 {
		every = time.Second
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		f.poll()
	}
}

// poll loads the files if their content changed since the last look.
func (f *Files) poll() {
	raw, err := f.read()
	if err != nil {
		f.Log.Error(err, "Cannot read the peer TLS files; keeping the current certificate and bundle")
		return
	}
	f.mu.RLock()
	same := bytes.Equal(raw, f.seen)
	f.mu.RUnlock()
	if same {
		return
	}
	if err := f.load(raw); err != nil {
		f.mu.Lock()
		f.seen = raw
		f.mu.Unlock()
		f.Log.Error(err, "New peer TLS files do not load; keeping the current certificate and bundle until they do")
		return
	}
	f.mu.RLock()
	leaf := f.cert.Leaf
	f.mu.RUnlock()
	f.Log.Info("Reloaded the peer certificate and trust bundle", "subject", leaf.Subject.String(),
		"notAfter", leaf.NotAfter, "uris", fmt.Sprint(leaf.URIs))
}

// read returns the three files' contents, joined, for change detection and load.
func (f *Files) read() ([]byte, error) {
	var all [][]byte
	for _, name := range []string{f.CertFile, f.KeyFile, f.CAFile} {
		b, err := os.ReadFile(name)
		if err != nil {
			return nil, err
		}
		all = append(all, b)
	}
	return bytes.Join(all, []byte{0}), nil
}

// load parses raw (as read returns it) and swaps it in.
func (f *Files) load(raw []byte) error {
	parts := bytes.SplitN(raw, []byte{0}, 3)
	cert, err := tls.X509KeyPair(parts[0], parts[1])
	if err != nil {
		return fmt.Errorf("--tls-cert %s / --tls-key %s: %w", f.CertFile, f.KeyFile, err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(parts[2]) {
		return fmt.Errorf("--tls-ca %s: no PEM certificate", f.CAFile)
	}
	if cert.Leaf == nil {
		return errors.New("certificate has no leaf")
	}
	if f.Pod.UID != "" {
		if err := Verify(cert.Leaf, f.Pod); err != nil {
			return fmt.Errorf("--tls-cert %s is not this pod's: %w", f.CertFile, err)
		}
	}
	f.mu.Lock()
	f.cert, f.roots, f.seen = &cert, roots, raw
	f.mu.Unlock()
	return nil
}

// Certificate implements Source.
func (f *Files) Certificate() (*tls.Certificate, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.cert == nil {
		return nil, errors.New("no peer certificate loaded")
	}
	return f.cert, nil
}

// Roots implements Source.
func (f *Files) Roots() *x509.CertPool {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.roots
}
