package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport/spdy"
	httpstream "k8s.io/streaming/pkg/httpstream"
)

// forwarder opens TCP streams to a port of a pod through the API server's
// pods/portforward subresource, as kubectl port-forward does: over WebSocket, falling
// back to SPDY when the API server or a proxy in between does not upgrade to it. It
// needs no local listener: each stream is one connection to the pod's port.
type forwarder struct {
	cfg *rest.Config
	cs  kubernetes.Interface
}

// dial returns a connection to port inside pod ns/name. Each call opens its own
// upgraded connection, so a stream's failure never affects another.
func (f *forwarder) dial(ctx context.Context, ns, name string, port int) (*podConn, error) {
	u := f.cs.CoreV1().RESTClient().Post().Resource("pods").Namespace(ns).Name(name).SubResource("portforward").URL()
	transport, upgrader, err := spdy.RoundTripperFor(f.cfg)
	if err != nil {
		return nil, err
	}
	dialer := spdy.NewDialerForStreaming(upgrader, &http.Client{Transport: transport}, http.MethodPost, u)
	if tunnel, err := portforward.NewSPDYOverWebsocketDialerForStreaming(u, f.cfg); err == nil {
		dialer = portforward.NewFallbackDialerForStreaming(tunnel, dialer, func(err error) bool {
			return httpstream.IsUpgradeFailure(err) || httpstream.IsHTTPSProxyError(err)
		})
	}
	type result struct {
		conn httpstream.Connection
		err  error
	}
	// Dial takes no context: a dial still running when ctx ends is abandoned and its
	// connection closed when it arrives.
	done := make(chan result, 1)
	go func() {
		c, _, err := dialer.Dial(portforward.PortForwardProtocolV1Name)
		done <- result{c, err}
	}()
	var conn httpstream.Connection
	select {
	case r := <-done:
		if r.err != nil {
			return nil, fmt.Errorf("port-forwarding to pod %s/%s: %w", ns, name, r.err)
		}
		conn = r.conn
	case <-ctx.Done():
		go func() {
			if r := <-done; r.conn != nil {
				_ = r.conn.Close()
			}
		}()
		return nil, ctx.Err()
	}
	pc, err := openStreams(conn, port)
	if err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("port-forwarding to pod %s/%s: %w", ns, name, err)
	}
	return pc, nil
}

// openStreams creates the error and data streams of one forwarded connection, with the
// headers the kubelet's port-forward protocol expects.
func openStreams(conn httpstream.Connection, port int) (*podConn, error) {
	h := http.Header{}
	h.Set(corev1.StreamType, corev1.StreamTypeError)
	h.Set(corev1.PortHeader, strconv.Itoa(port))
	h.Set(corev1.PortForwardRequestIDHeader, "0")
	errStream, err := conn.CreateStream(h)
	if err != nil {
		return nil, err
	}
	_ = errStream.Close() // nothing is written to the error stream
	pc := &podConn{conn: conn, errDone: make(chan struct{})}
	go func() {
		defer close(pc.errDone)
		msg, err := io.ReadAll(errStream)
		pc.mu.Lock()
		defer pc.mu.Unlock()
		switch {
		case len(msg) > 0:
			pc.remoteErr = errors.New(strings.TrimSpace(string(msg)))
		case err != nil:
			pc.remoteErr = err
		}
	}()
	h.Set(corev1.StreamType, corev1.StreamTypeData)
	pc.data, err = conn.CreateStream(h)
	if err != nil {
		return nil, err
	}
	return pc, nil
}

// podConn is one forwarded connection: reads and writes go to the pod's port.
type podConn struct {
	conn httpstream.Connection
	data httpstream.Stream
	// errDone closes once the error stream ended; remoteErr is what it carried (the
	// kubelet reports there that nothing listens on the port, for instance).
	errDone   chan struct{}
	mu        sync.Mutex
	remoteErr error
	closeOnce sync.Once
}

func (c *podConn) Read(p []byte) (int, error) {
	n, err := c.data.Read(p)
	if err != nil {
		if rerr := c.remote(); rerr != nil {
			return n, rerr
		}
	}
	return n, err
}

func (c *podConn) Write(p []byte) (int, error) {
	n, err := c.data.Write(p)
	if err != nil {
		if rerr := c.remote(); rerr != nil {
			return n, rerr
		}
	}
	return n, err
}

// CloseWrite says no more data will be sent, so the pod's side sees end of input, and
// waits (at most closeWait) for the far end to finish: closing the stream earlier
// would discard data still in flight. What arrives meanwhile is discarded.
func (c *podConn) CloseWrite() error {
	if err := c.data.Close(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = io.Copy(io.Discard, c.data)
	}()
	select {
	case <-done:
	case <-c.conn.CloseChan():
	case <-time.After(closeWait):
	}
	return nil
}

// closeWait bounds CloseWrite's wait. The kubelet's runtime ends a forwarded
// connection about a second after its client's end of input.
const closeWait = 5 * time.Second

// Close ends the forwarded connection.
func (c *podConn) Close() error {
	c.closeOnce.Do(func() {
		_ = c.data.Reset()
		_ = c.conn.Close()
	})
	return nil
}

// remote waits briefly for the error stream's verdict on a failed stream: it usually
// arrives just after the data stream ends.
func (c *podConn) remote() error {
	select {
	case <-c.errDone:
	case <-c.conn.CloseChan():
	case <-time.After(500 * time.Millisecond):
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.remoteErr
}
