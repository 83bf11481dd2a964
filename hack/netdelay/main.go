//go:build linux

// Command netdelay delays packets that an iptables NFQUEUE rule hands it: each packet is
// accepted again after DELAY ± JITTER (uniform), so packets overtake each other and arrive
// reordered; with -reorder PCT, that share of packets is accepted at once instead, overtaking
// the delayed ones (netem's "delay D reorder PCT"). It is the e2e fault suite's stand-in for `tc netem delay` on kernels without
// sch_netem (hack/node/fault.sh runs it); the rule's --queue-bypass lets packets through
// unharmed when it is not running.
//
//	netdelay -queue 100 -delay 50ms -jitter 20ms [-reorder 10]
package main

import (
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Netfilter queue netlink constants (linux/netfilter/nfnetlink_queue.h).
const (
	subsysQueue    = 3
	msgPacket      = 0
	msgVerdict     = 1
	msgConfig      = 2
	cfgCmd         = 1
	cfgParams      = 2
	cmdBind        = 1
	copyMeta       = 1
	attrPacketHdr  = 1
	attrVerdictHdr = 2
	nfAccept       = 1
)

func main() {
	queue := flag.Uint("queue", 100, "NFQUEUE number")
	delay := flag.Duration("delay", 50*time.Millisecond, "mean delay")
	jitter := flag.Duration("jitter", 20*time.Millisecond, "uniform ± jitter")
	reorder := flag.Int("reorder", 0, "percentage of packets accepted at once, overtaking the delayed ones")
	flag.Parse()
	// run serves until SIGTERM (which exits 0) or an error.
	err := run(uint16(*queue), *delay, *jitter, *reorder)
	fmt.Fprintln(os.Stderr, "netdelay:", err)
	os.Exit(1)
}

func run(queue uint16, delay, jitter time.Duration, reorder int) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW, unix.NETLINK_NETFILTER)
	if err != nil {
		return err
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
	cmd := []byte{cmdBind, 0, 0, 0}
	binary.BigEndian.PutUint16(cmd[2:], unix.AF_INET)
	params := make([]byte, 5)
	binary.BigEndian.PutUint32(params, 0xffff)
	params[4] = copyMeta
	var mu sync.Mutex // one writer on the socket
	send := func(typ uint16, attrs ...[]byte) error {
		mu.Lock()
		defer mu.Unlock()
		_, err := unix.Write(fd, message(typ, queue, attrs...))
		return err
	}
	if err := send(msgConfig, attr(cfgCmd, cmd)); err != nil {
		return fmt.Errorf("bind queue %d: %w", queue, err)
	}
	if err := send(msgConfig, attr(cfgParams, params)); err != nil {
		return fmt.Errorf("configure queue %d: %w", queue, err)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		os.Exit(0)
	}()
	fmt.Printf("netdelay: queue %d, delay %s ± %s, reorder %d%%\n", queue, delay, jitter, reorder)
	buf := make([]byte, 1<<16)
	for {
		n, err := unix.Read(fd, buf)
		if err != nil {
			if errors.Is(err, unix.ENOBUFS) || errors.Is(err, unix.EINTR) {
				continue
			}
			return err
		}
		for _, id := range packetIDs(buf[:n]) {
			accept := func() {
				v := make([]byte, 8)
				binary.BigEndian.PutUint32(v, nfAccept)
				binary.BigEndian.PutUint32(v[4:], id)
				_ = send(msgVerdict, attr(attrVerdictHdr, v))
			}
			if rand.IntN(100) < reorder {
				accept()
				continue
			}
			time.AfterFunc(delay-jitter+time.Duration(rand.Int64N(int64(2*jitter)+1)), accept)
		}
	}
}

// message builds one nfnetlink message of the queue subsystem for queue.
func message(typ, queue uint16, attrs ...[]byte) []byte {
	body := []byte{unix.AF_UNSPEC, 0, 0, 0} // nfgenmsg: family, version, res_id (queue)
	binary.BigEndian.PutUint16(body[2:], queue)
	for _, a := range attrs {
		body = append(body, a...)
	}
	msg := make([]byte, unix.NLMSG_HDRLEN, unix.NLMSG_HDRLEN+len(body))
	binary.NativeEndian.PutUint32(msg[0:], uint32(unix.NLMSG_HDRLEN+len(body)))
	binary.NativeEndian.PutUint16(msg[4:], subsysQueue<<8|typ)
	binary.NativeEndian.PutUint16(msg[6:], unix.NLM_F_REQUEST)
	return append(msg, body...)
}

func attr(typ uint16, data []byte) []byte {
	a := make([]byte, 4, 4+len(data)+3)
	binary.NativeEndian.PutUint16(a[0:], uint16(4+len(data)))
	binary.NativeEndian.PutUint16(a[2:], typ)
	a = append(a, data...)
	for len(a)%4 != 0 {
		a = append(a, 0)
	}
	return a
}

// packetIDs returns the ids of the queued-packet messages in one netlink read.
func packetIDs(b []byte) []uint32 {
	var ids []uint32
	for len(b) >= unix.NLMSG_HDRLEN {
		l := int(binary.NativeEndian.Uint32(b[0:]))
		typ := binary.NativeEndian.Uint16(b[4:])
		if l < unix.NLMSG_HDRLEN || l > len(b) {
			break
		}
		if typ == subsysQueue<<8|msgPacket {
			attrs := b[unix.NLMSG_HDRLEN+4 : l]
			for len(attrs) >= 4 {
				al := int(binary.NativeEndian.Uint16(attrs[0:]))
				at := binary.NativeEndian.Uint16(attrs[2:]) & 0x3fff
				if al < 4 || al > len(attrs) {
					break
				}
				if at == attrPacketHdr && al >= 8 {
					ids = append(ids, binary.BigEndian.Uint32(attrs[4:]))
				}
				attrs = attrs[min((al+3)&^3, len(attrs)):]
			}
		}
		next := (l + 3) &^ 3
		if next > len(b) {
			break
		}
		b = b[next:]
	}
	return ids
}
