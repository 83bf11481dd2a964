package podnet

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"syscall"

	"golang.org/x/sys/unix"
)

// Run runs the running binary again in the pod network, with the same arguments, standard
// streams and environment plus env, and waits for it. It returns the error of
// exec.Cmd.Wait (an *exec.ExitError carries the child's status), or why the namespaces
// could not be created.
//
// The child gets SIGTERM if this process dies, so it can stop what it started. While it
// runs, this process survives SIGINT and SIGTERM and passes on to the child the signals in
// forward: a terminal's Ctrl-C reaches both processes (they share a process group), so a
// child that counts its interrupts wants SIGINT not forwarded, while SIGQUIT forwarded
// makes a test binary dump its goroutines.
func Run(env []string, forward ...os.Signal) error {
	cmd := exec.Command("/proc/self/exe", os.Args[1:]...) //nolint:noctx // the child stops on the signals it shares with us or is forwarded
	cmd.Args[0] = os.Args[0]
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGTERM}
	namespaces := networkNamespace
	// The user namespace maps only the caller, to root: the kernel lets an unprivileged
	// process write that one mapping of its own IDs.
	if uid, gid := os.Geteuid(), os.Getegid(); uid != 0 {
		cmd.SysProcAttr.Cloneflags |= syscall.CLONE_NEWUSER
		cmd.SysProcAttr.UidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: uid, Size: 1}}
		cmd.SysProcAttr.GidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: gid, Size: 1}}
		namespaces = userNamespace
	}
	cmd.Env = append(append(os.Environ(), env...), markerEnv+"="+namespaces)

	// Catch the signals before the child exists, so that none ends this process first.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, append([]os.Signal{syscall.SIGINT, syscall.SIGTERM}, forward...)...)
	defer signal.Stop(sigs)
	if err := cmd.Start(); err != nil {
		if namespaces == userNamespace {
			return fmt.Errorf("creating a user and a network namespace: %w\n%s", err, userNamespaceHelp)
		}
		return fmt.Errorf("creating a network namespace: %w", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for s := range sigs {
			if slices.Contains(forward, s) {
				_ = cmd.Process.Signal(s)
			}
		}
	}()
	err := cmd.Wait()
	// After Stop no signal is sent on sigs, so closing it ends the forwarding goroutine.
	signal.Stop(sigs)
	close(sigs)
	<-done
	return err
}

// Setup brings loopback up and adds `local CIDR dev lo` to the local routing table; the
// child calls it first. Every address of CIDR is then bindable.
func Setup() error {
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
	return addLocalRoute(netip.MustParsePrefix(CIDR), lo.Index)
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
