package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Why a network namespace: the API server refuses loopback addresses in EndpointSlices
// (endpoint IPs may not be loopback, link-local or unspecified), and without root the only
// addresses a Linux machine routes to itself are 127.0.0.0/8 and its own few. So the demo
// re-executes itself in a new user and network namespace (unprivileged, like rootless
// containers), where it may give each pod an ordinary pod-network address on the loopback
// interface. Everything the demo starts lives there, out of the way of the machine's own
// ports. The outer process stays in the machine's namespace to forward a local port to the
// API server, so the user's kubectl can reach it.

// innerEnv marks the re-executed demo, inside the namespace; its value is the directory
// the outer process created for the run.
const innerEnv = "PODIPC_DEMO_DIR"

// userNamespaceEnv is set for the re-executed demo when it runs in a user namespace too.
const userNamespaceEnv = "PODIPC_DEMO_USERNS"

// podNetwork is the prefix of the pods' addresses inside the namespace (kind's pod range).
const podNetwork = "10.244.0."

// apiSocket is the Unix socket, in the run's directory, through which the outer process
// reaches the API server inside the namespace (Unix sockets are files, not bound to a
// network namespace).
const apiSocket = "apiserver.sock"

// runOutside runs the demo in a new network namespace and returns its exit code. It
// forwards hostAPI, a port on the machine's 127.0.0.1, to the API server inside.
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

	cmd := exec.Command("/proc/self/exe", os.Args[1:]...) //nolint:noctx // the child stops on the signals it shares with us
	cmd.Args[0] = os.Args[0]
	cmd.Env = append(os.Environ(), innerEnv+"="+dir, "PODIPC_DEMO_HOST_API="+hostAPI.Addr().String())
	if os.Getuid() != 0 {
		cmd.Env = append(cmd.Env, userNamespaceEnv+"=1")
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = namespaceAttr()
	// The terminal's Ctrl-C reaches the child directly (same process group); this process
	// only waits for it, and passes on a SIGTERM sent to it alone.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "make demo: cannot create a network namespace: %v\n%s", err, namespaceHelp)
		return 1
	}
	go func() {
		for sig := range sigs {
			if sig == syscall.SIGTERM {
				_ = cmd.Process.Signal(sig)
			}
		}
	}()
	if err := cmd.Wait(); err != nil {
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			return exit.ExitCode()
		}
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// namespaceHelp says what to do where unprivileged user namespaces are disabled.
const namespaceHelp = `The demo needs an unprivileged user namespace, as rootless containers do, to give the
pods addresses of their own without root. Where they are disabled:
  Ubuntu 23.10+: sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0
  Debian <= 10:  sudo sysctl kernel.unprivileged_userns_clone=1
or run the demo as root.
`

// namespaceAttr creates the child in a new network namespace and, unless this process is
// root, in a new user namespace where the user is root (and so may configure that
// network namespace, and nothing outside it).
func namespaceAttr() *syscall.SysProcAttr {
	attr := &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGTERM}
	if os.Getuid() != 0 {
		attr.Cloneflags |= syscall.CLONE_NEWUSER
		attr.UidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getuid(), Size: 1}}
		attr.GidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getgid(), Size: 1}}
	}
	return attr
}

// setupNetwork brings the namespace's loopback interface up and adds the node's and the
// pods' addresses to it, as /32s: podNetwork+"1" for the node, then .11, .12, … for the
// pods.
func setupNetwork(pods int) (node string, ips []string, err error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return "", nil, err
	}
	defer func() { _ = unix.Close(fd) }()
	lo, err := unix.NewIfreq("lo")
	if err != nil {
		return "", nil, err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, lo); err != nil {
		return "", nil, fmt.Errorf("reading the loopback interface: %w", err)
	}
	lo.SetUint16(lo.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, lo); err != nil {
		return "", nil, fmt.Errorf("bringing the loopback interface up: %w", err)
	}
	node = podNetwork + "1"
	for i := 1; i <= pods; i++ {
		ips = append(ips, podNetwork+strconv.Itoa(10+i))
	}
	for i, ip := range append([]string{node}, ips...) {
		if err := addAddress(fd, "lo:"+strconv.Itoa(i+1), ip); err != nil {
			return "", nil, err
		}
	}
	return node, ips, nil
}

// addAddress adds ip/32 to the loopback interface under label, the way ifconfig does.
func addAddress(fd int, label, ip string) error {
	for _, set := range []struct {
		req  uint
		addr net.IP
	}{{unix.SIOCSIFADDR, net.ParseIP(ip)}, {unix.SIOCSIFNETMASK, net.IPv4(255, 255, 255, 255)}} {
		ifr, err := unix.NewIfreq(label)
		if err != nil {
			return err
		}
		if err := ifr.SetInet4Addr(set.addr.To4()); err != nil {
			return err
		}
		if err := unix.IoctlIfreq(fd, set.req, ifr); err != nil {
			return fmt.Errorf("adding %s to the loopback interface: %w", ip, err)
		}
	}
	return nil
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
