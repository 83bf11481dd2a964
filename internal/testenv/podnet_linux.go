package testenv

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"syscall"

	"golang.org/x/sys/unix"
)

// EnterPodNetwork moves the test binary into a private network namespace in which
// PodCIDR is local, and returns there; call it first in TestMain, before Main.
//
// Real sidecars must run on addresses a pod could have: the API server refuses loopback
// addresses in EndpointSlices, and a sidecar accepts a peer link only from the member's
// IP, so the sidecars of a test need distinct, bindable, non-loopback addresses, which a
// loopback-only machine does not have. The binary re-executes itself in a new network
// namespace (and, without root, a new user namespace mapping the caller to root there,
// so no privilege is needed where unprivileged user namespaces are allowed), brings
// loopback up and routes PodCIDR to it as local addresses (the "AnyIP" local route). The
// control plane (advertising podNetworkAPIServerIP, as the network has no default route to
// take an address from), the sidecars and the test all run inside; nothing on the machine's own
// network changes, and nothing can collide with other tests' ports. The child dies with
// the parent (Pdeathsig), and the parent exits with the child's status.
func EnterPodNetwork() {
	if os.Getenv(podNetworkEnv) == "1" {
		if err := setupPodNetwork(); err != nil {
			fmt.Fprintf(os.Stderr, "FAIL: setting up the pod network: %v\n", err)
			os.Exit(1)
		}
		return
	}
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: entering the pod network: %v\n", err)
		os.Exit(1)
	}
	cmd := exec.CommandContext(context.Background(), exe, os.Args[1:]...) // ends with the child's own timeout
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), podNetworkEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}
	if uid, gid := os.Geteuid(), os.Getegid(); uid != 0 {
		cmd.SysProcAttr.Cloneflags |= syscall.CLONE_NEWUSER
		cmd.SysProcAttr.UidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: uid, Size: 1}}
		cmd.SysProcAttr.GidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: gid, Size: 1}}
	}
	// Forward interrupts so the child stops its control plane; the test timeout is the
	// child's own (it parses the same -test.timeout).
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGQUIT)
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: entering the pod network (a new network namespace; without root this needs unprivileged user namespaces): %v\n", err)
		os.Exit(1)
	}
	go func() {
		for s := range sigs {
			_ = cmd.Process.Signal(s)
		}
	}()
	err = cmd.Wait()
	var exit *exec.ExitError
	switch {
	case err == nil:
		os.Exit(0)
	case errors.As(err, &exit) && exit.ExitCode() >= 0:
		os.Exit(exit.ExitCode())
	default:
		fmt.Fprintf(os.Stderr, "FAIL: the test binary in the pod network: %v\n", err)
		os.Exit(1)
	}
}

// setupPodNetwork brings loopback up and adds `local PodCIDR dev lo` to the local table.
func setupPodNetwork() error {
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		return err
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer func() { _ = unix.Close(fd) }()
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("reading the flags of lo: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("bringing lo up: %w", err)
	}
	return addLocalRoute(netip.MustParsePrefix(PodCIDR), lo.Index)
}

// addLocalRoute adds a route of type local for prefix through the interface ifindex, over
// rtnetlink, and waits for the kernel's acknowledgement.
func addLocalRoute(prefix netip.Prefix, ifindex int) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer func() { _ = unix.Close(fd) }()
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	attr := func(typ uint16, data []byte) []byte {
		n := unix.SizeofRtAttr + len(data)
		b := make([]byte, (n+unix.RTA_ALIGNTO-1) & ^(unix.RTA_ALIGNTO-1))
		binary.NativeEndian.PutUint16(b[0:2], uint16(n))
		binary.NativeEndian.PutUint16(b[2:4], typ)
		copy(b[unix.SizeofRtAttr:], data)
		return b
	}
	dst := prefix.Addr().As4()
	var oif [4]byte
	binary.NativeEndian.PutUint32(oif[:], uint32(ifindex))
	// struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
	body := make([]byte, 0, 32)
	body = append(body, unix.AF_INET, byte(prefix.Bits()), 0, 0, unix.RT_TABLE_LOCAL, unix.RTPROT_BOOT, unix.RT_SCOPE_HOST, unix.RTN_LOCAL, 0, 0, 0, 0)
	body = append(body, attr(unix.RTA_DST, dst[:])...)
	body = append(body, attr(unix.RTA_OIF, oif[:])...)
	// struct nlmsghdr: len, type, flags, seq, pid.
	msg := make([]byte, unix.SizeofNlMsghdr, unix.SizeofNlMsghdr+len(body))
	binary.NativeEndian.PutUint32(msg[0:4], uint32(len(msg)+len(body)))
	binary.NativeEndian.PutUint16(msg[4:6], unix.RTM_NEWROUTE)
	binary.NativeEndian.PutUint16(msg[6:8], unix.NLM_F_REQUEST|unix.NLM_F_ACK|unix.NLM_F_CREATE|unix.NLM_F_EXCL)
	binary.NativeEndian.PutUint32(msg[8:12], 1)
	msg = append(msg, body...)
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, 4096)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return err
	}
	msgs, err := syscall.ParseNetlinkMessage(buf[:n])
	if err != nil {
		return err
	}
	for _, m := range msgs {
		if m.Header.Type == unix.NLMSG_ERROR && len(m.Data) >= 4 {
			if errno := int32(binary.NativeEndian.Uint32(m.Data[:4])); errno != 0 {
				return fmt.Errorf("adding the route local %s dev lo: %w", prefix, syscall.Errno(-errno))
			}
			return nil
		}
	}
	return errors.New("no acknowledgement from rtnetlink")
}
