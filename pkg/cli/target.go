package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"time"

	"k8s.io/client-go/kubernetes"
)

// conn is one connection to a channel's line port, local or forwarded into a pod.
type conn interface {
	io.ReadWriteCloser
	CloseWrite() error
}

// target is where send and tail reach a channel's line port.
type target interface {
	// dial connects to the line port; where names the place for messages ("pod
	// shop/pod-1", "127.0.0.1:7000"). After a failed or lost connection, the next dial
	// is told so through lost and may choose another place.
	dial(ctx context.Context, lost bool) (c conn, where string, err error)
}

// localTarget is a sidecar on this machine: the pod the command runs in, or a sidecar
// started with --discovery=static.
type localTarget struct{ addr string }

func (t *localTarget) dial(ctx context.Context, _ bool) (conn, string, error) {
	d := net.Dialer{Timeout: dialTimeout}
	c, err := d.DialContext(ctx, "tcp", t.addr)
	if err != nil {
		return nil, t.addr, fmt.Errorf("connecting to the sidecar at %s (is this a member pod of the channel?): %w", t.addr, err)
	}
	return c.(*net.TCPConn), t.addr, nil
}

// memberTarget reaches the channel from outside the cluster: a port-forward through the
// API server into a ready member pod, whose sidecar serves the channel on its
// localhost. With pod set it always uses that pod; otherwise it picks a ready member,
// and after a lost connection another ready member if there is one.
type memberTarget struct {
	cs      kubernetes.Interface
	fw      func(ctx context.Context, ns, pod string, port int) (conn, error)
	ns      string
	channel string
	port    int
	// pod is --pod; current is the member the last dial chose.
	pod     string
	current string
}

func (t *memberTarget) dial(ctx context.Context, lost bool) (conn, string, error) {
	pod := t.pod
	if pod == "" {
		ms, err := listMembers(ctx, t.cs, t.ns, t.channel)
		if err != nil {
			return nil, "", err
		}
		avoid := ""
		if lost {
			avoid = t.current
		}
		var ok bool
		if pod, ok = pickMember(ms, t.current, avoid); !ok {
			return nil, "", fmt.Errorf("no ready member pod of channel %s in namespace %s (podipc members %s -n %s lists them)", t.channel, t.ns, t.channel, t.ns)
		}
	}
	t.current = pod
	where := "pod " + t.ns + "/" + pod
	c, err := t.fw(ctx, t.ns, pod, t.port)
	if err != nil {
		return nil, where, err
	}
	return c, where, nil
}

// pickMember chooses the member pod to attach to among ms (sorted by name): a ready,
// not terminating one; the current one if it still is, unless it is to be avoided (its
// connection was just lost) and another is ready.
func pickMember(ms []member, current, avoid string) (string, bool) {
	var ready []string
	for _, m := range ms {
		if m.Ready && !m.Terminating && m.Pod != "<unknown>" {
			ready = append(ready, m.Pod)
		}
	}
	if len(ready) == 0 {
		return "", false
	}
	for _, p := range ready {
		if p == current && p != avoid {
			return p, true
		}
	}
	for _, p := range ready {
		if p != avoid {
			return p, true
		}
	}
	return ready[0], true
}

// inCluster says the command runs in a pod with no kubeconfig of its own: then a
// channel's line port is on this pod's localhost.
func inCluster(o *kubeOptions) bool {
	return os.Getenv("KUBERNETES_SERVICE_HOST") != "" && o.kubeconfig == "" && o.context == "" && os.Getenv("KUBECONFIG") == ""
}

// resolveTarget decides where send and tail reach the channel named (or numbered) by
// arg: on this machine with --port, --address, a port number or inside a pod; else
// through a port-forward into a member pod (--pod names one).
func (o *endpointOptions) resolveTarget(ctx context.Context, streams Streams, arg string, addressSet bool) (target, error) {
	if arg == "" && o.port == 0 {
		return nil, errors.New("name a channel or a port, or pass --port")
	}
	_, numeric := strconv.Atoi(arg)
	local := o.pod == "" && (o.port != 0 || addressSet || numeric == nil || inCluster(&o.kube))
	if local {
		addr, err := o.resolve(ctx, streams, arg)
		if err != nil {
			return nil, err
		}
		return &localTarget{addr: addr}, nil
	}
	cfg, ns, err := o.kube.config(streams)
	if err != nil {
		return nil, err
	}
	port := o.port
	switch n, nerr := strconv.Atoi(arg); {
	case port != 0:
	case nerr == nil:
		port, arg = n, "" // --pod with a port number: that port of that pod
	default:
		if port, err = o.kube.channelPort(ctx, streams, arg); err != nil {
			return nil, err
		}
	}
	if port < 1 || port > 65535 {
		return nil, fmt.Errorf("port %d out of range 1-65535", port)
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	fw := &forwarder{cfg: cfg, cs: cs}
	return &memberTarget{cs: cs, ns: ns, channel: arg, port: port, pod: o.pod,
		fw: func(ctx context.Context, ns, pod string, port int) (conn, error) {
			ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			return fw.dial(ctx, ns, pod, port)
		}}, nil
}
