package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/podipc/podipc/pkg/ipc"
)

// arrival is a line read by an app connection.
type arrival struct {
	pod, line string
	at        time.Time
}

// apps are the demo's app connections: one writer on the first pod, a reader on each other.
type apps struct {
	writer  *ipc.Socket
	readers []*ipc.Socket
	// arrivals receives every line the readers read. The readers' goroutines end (and wg
	// with them) when their sockets end or quit is closed, whichever comes first, so that
	// close never waits on a reader blocked on a full arrivals.
	arrivals chan arrival
	quit     chan struct{}
	wg       sync.WaitGroup
}

// connectApps dials the channel's line port on every member's address, as each pod's app
// would dial 127.0.0.1:<localPort>, and waits until the sidecars have registered the
// connections and see each other serving, so that the first line is not sent into a mesh
// still forming (Broadcast sends to the members that discovery reports serving, by design).
func connectApps(ctx context.Context, members []*member, channel string, port int32) (*apps, error) {
	a := &apps{arrivals: make(chan arrival, 64), quit: make(chan struct{})}
	for i, m := range members {
		s, err := dialApp(ctx, m, port)
		if err != nil {
			a.close()
			return nil, err
		}
		if i == 0 {
			a.writer = s
			continue
		}
		a.readers = append(a.readers, s)
		a.wg.Go(func() {
			for line := range s.In() {
				select {
				case a.arrivals <- arrival{pod: m.pod.Name, line: line, at: time.Now()}:
				case <-a.quit:
					return
				}
			}
		})
	}
	if err := waitForMesh(ctx, members, channel); err != nil {
		a.close()
		return nil, err
	}
	return a, nil
}

// dialApp connects to a member's line port. A ready sidecar may still be opening it: its
// readiness waits for the first sync of discovery, not for every channel to be served (a
// Channel the pod's token cannot read yet is retried), so the dial is retried too.
func dialApp(ctx context.Context, m *member, port int32) (*ipc.Socket, error) {
	addr := net.JoinHostPort(m.ip, strconv.Itoa(int(port)))
	var s *ipc.Socket
	err := waitUntil(ctx, "the line port "+addr+" of "+m.pod.Name, 60*time.Second, m.sidecar, func(ctx context.Context) (bool, error) {
		var err error
		s, err = ipc.Dial(ctx, "tcp", addr)
		return err == nil, err
	})
	return s, err
}

// close ends every connection and waits for the readers.
func (a *apps) close() {
	close(a.quit)
	if a.writer != nil {
		_ = a.writer.Close()
	}
	for _, r := range a.readers {
		_ = r.Close()
	}
	a.wg.Wait()
}

// waitForMesh waits until each sidecar has a local connection on channel, a peer link up
// to every other member, and sees every other member serving, as its metrics say.
func waitForMesh(ctx context.Context, members []*member, channel string) error {
	hc := &http.Client{Timeout: 2 * time.Second}
	others := float64(len(members) - 1)
	for _, m := range members {
		err := waitUntil(ctx, "the sidecar of "+m.pod.Name+" to see its peers serving", 60*time.Second, m.sidecar, func(ctx context.Context) (bool, error) {
			body, err := httpGet(ctx, hc, m.adminURL("/metrics"))
			if err != nil {
				return false, err
			}
			text := string(body)
			return metric(text, `podipc_local_connections{channel="`+channel+`"}`) >= 1 &&
				metric(text, `podipc_members{channel="`+channel+`",state="serving"}`) >= others &&
				metric(text, `podipc_peer_links{direction="out",state="up"}`) >= others, nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// metric returns the value of the sample named series (name and labels, as exposed) in a
// Prometheus text exposition, or 0 if it is absent.
func metric(text, series string) float64 {
	for line := range strings.SplitSeq(text, "\n") {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			v, _ := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			return v
		}
	}
	return 0
}

// send writes one line from the writer's pod and prints it.
func (a *apps) send(ctx context.Context, out *printer, from, line string) error {
	select {
	case a.writer.Out() <- line:
		out.printf("  %s → %s\n", from, line)
		return nil
	case <-a.writer.Done():
		return fmt.Errorf("the connection to %s's sidecar ended: %w", from, a.writer.Err())
	case <-ctx.Done():
		return errStopped
	}
}

// expect prints arrivals until every reader has read every line of want, in order, and
// returns the time of the first arrival. Anything else arriving is an error: a Broadcast
// channel delivers each line once to each reader, never to its sender.
func (a *apps) expect(ctx context.Context, out *printer, sent time.Time, want []string) (time.Time, error) {
	next := map[string]int{}
	var first time.Time
	timeout := time.After(30 * time.Second)
	for remaining := len(want) * len(a.readers); remaining > 0; remaining-- {
		var got arrival
		select {
		case got = <-a.arrivals:
		case <-ctx.Done():
			return first, errStopped
		case <-timeout:
			return first, fmt.Errorf("after 30s, %d of %d deliveries had not arrived (received so far: %v)", remaining, len(want)*len(a.readers), next)
		}
		if first.IsZero() {
			first = got.at
		}
		i := next[got.pod]
		if i >= len(want) || got.line != want[i] {
			return first, fmt.Errorf("%s read %q; want line %d of %q", got.pod, got.line, i+1, want)
		}
		next[got.pod]++
		out.printf("  %s ← %s   (%s after sending)\n", got.pod, got.line, got.at.Sub(sent).Round(100*time.Microsecond))
	}
	return first, nil
}

// interact sends each line typed on in, printing arrivals as they come, until in ends
// (Ctrl-D) or ctx ends (Ctrl-C).
func (a *apps) interact(ctx context.Context, out *printer, from string, in io.Reader) error {
	lines := make(chan string)
	// Not joined: a read from a terminal cannot be interrupted. The goroutine ends with the
	// process, a moment after the demo has cleaned up.
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(in)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	for {
		select {
		case line, ok := <-lines:
			if !ok {
				return nil
			}
			if err := a.send(ctx, out, from, line); err != nil {
				return err
			}
		case got := <-a.arrivals:
			out.printf("  %s ← %s\n", got.pod, got.line)
		case <-ctx.Done():
			return nil
		}
	}
}
