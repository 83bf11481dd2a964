package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/podipc/podipc/internal/podnet"
)

// Why a network namespace: the API server refuses loopback addresses in EndpointSlices, so
// the demo re-executes itself in a pod network of its own (package podnet), where it gives
// each pod an ordinary pod-network address. Everything the demo starts lives there, out of
// the way of the machine's own ports. The outer process stays in the machine's namespace
// to forward a local port to the API server, so the user's kubectl can reach it.

// innerEnv marks the re-executed demo, inside the namespace; its value is the directory
// the outer process created for the run.
const innerEnv = "PODIPC_DEMO_DIR"

// podNetwork is the prefix of the pods' addresses, in podnet.CIDR.
const podNetwork = "10.244.0."

// apiSocket is the Unix socket, in the run's directory, through which the outer process
// reaches the API server inside the namespace (Unix sockets are files, not bound to a
// network namespace).
const apiSocket = "apiserver.sock"

// runOutside runs the demo in the pod network and returns its exit code. It forwards
// hostAPI, a port on the machine's 127.0.0.1, to the API server inside.
func runOutside(o options) int {
	dir, err := os.MkdirTemp("", "podipc-demo-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer func() {
		if o.keep {
			fmt.Printf("kept %s (logs, kubeconfigs)\n", dir)
		} else if err := os.RemoveAll(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
		}
	}()
	var lc net.ListenConfig
	hostAPI, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fwd := &forwarder{listener: hostAPI, network: "unix", address: dir + "/" + apiSocket}
	go fwd.serve()
	defer fwd.close()

	// The terminal's Ctrl-C reaches the child directly (same process group), and a second
	// one would make it exit without cleaning up; so pass on only a SIGTERM sent to this
	// process alone.
	err = podnet.Run([]string{innerEnv + "=" + dir, "PODIPC_DEMO_HOST_API=" + hostAPI.Addr().String()}, syscall.SIGTERM)
	var exit *exec.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &exit):
		return exit.ExitCode()
	default:
		fmt.Fprintf(os.Stderr, "make demo: %v\n", err)
		return 1
	}
}

// podIPs returns the addresses of n pods: podNetwork+"11", +"12", and so on (the node
// has podnet.NodeIP).
func podIPs(n int) []string {
	ips := make([]string, 0, n)
	for i := 1; i <= n; i++ {
		ips = append(ips, podNetwork+strconv.Itoa(10+i))
	}
	return ips
}

// forwarder copies each connection accepted by listener to a new connection to address.
type forwarder struct {
	listener         net.Listener
	network, address string
	// conns are the open connections, both sides, which close ends.
	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// serve accepts until the listener is closed.
func (f *forwarder) serve() {
	for {
		c, err := f.listener.Accept()
		if err != nil {
			return
		}
		var d net.Dialer
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		up, err := d.DialContext(ctx, f.network, f.address)
		cancel()
		if err != nil {
			_ = c.Close()
			continue
		}
		f.track(c, up)
		f.wg.Go(func() { f.pipe(c, up) })
		f.wg.Go(func() { f.pipe(up, c) })
	}
}

func (f *forwarder) track(conns ...net.Conn) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.conns == nil {
		f.conns = map[net.Conn]struct{}{}
	}
	for _, c := range conns {
		f.conns[c] = struct{}{}
	}
}

// pipe copies from src to dst, then closes both, which ends the other direction too.
func (f *forwarder) pipe(dst, src net.Conn) {
	_, _ = io.Copy(dst, src)
	_ = dst.Close()
	_ = src.Close()
	f.mu.Lock()
	delete(f.conns, dst)
	delete(f.conns, src)
	f.mu.Unlock()
}

// close stops accepting, ends every forwarded connection and waits for the copies.
func (f *forwarder) close() {
	_ = f.listener.Close()
	f.mu.Lock()
	for c := range f.conns {
		_ = c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}

// serveAPISocket forwards the run directory's Unix socket to the API server at addr,
// until ctx ends.
func serveAPISocket(ctx context.Context, dir, addr string) (*forwarder, error) {
	var lc net.ListenConfig
	l, err := lc.Listen(ctx, "unix", dir+"/"+apiSocket)
	if err != nil {
		return nil, err
	}
	f := &forwarder{listener: l, network: "tcp", address: addr}
	go f.serve()
	return f, nil
}
