package main

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
)

// natsPath is the NATS route: a publishing client and one or more subscribing clients,
// each with its own connection to one nats-server. Lines travel as message payloads,
// '\n' included, so the bytes per message equal the bytes per line on the TCP paths.
type natsPath struct {
	pub     *nats.Conn
	subs    []*nats.Conn // the receiving apps
	subject string       // sending app → receiving apps
	reply   string       // receiving app → sending app (the echo)
	replies *nats.Subscription
	done    chan struct{}
}

// natsRun numbers the subjects of each opened path, so a late message of an earlier run
// can never reach a later one.
var natsRun atomic.Uint64

// openNATS connects a sending app and receivers receiving apps to the server at url.
func openNATS(url string, receivers int) (*natsPath, error) {
	opts := []nats.Option{nats.NoReconnect(), nats.Timeout(5 * time.Second)}
	pub, err := nats.Connect(url, append(opts, nats.Name("loadtest-sender"))...)
	if err != nil {
		return nil, fmt.Errorf("sending app: %w", err)
	}
	n := natsRun.Add(1)
	p := &natsPath{
		pub:     pub,
		subject: fmt.Sprintf("bench.%d.line", n),
		reply:   fmt.Sprintf("bench.%d.echo", n),
		done:    make(chan struct{}),
	}
	for range receivers {
		sub, err := nats.Connect(url, append(opts, nats.Name("loadtest-receiver"))...)
		if err != nil {
			_ = p.Close()
			return nil, fmt.Errorf("receiving app: %w", err)
		}
		p.subs = append(p.subs, sub)
	}
	p.replies, err = pub.SubscribeSync(p.reply)
	if err == nil {
		err = pub.Flush() // The server has the subscription before anything is echoed.
	}
	if err != nil {
		_ = p.Close()
		return nil, err
	}
	return p, nil
}

func (p *natsPath) Send(line []byte) error { return p.pub.Publish(p.subject, line) }

// Flush does nothing: the client's flusher goroutine writes a publication out as soon as
// it is queued, and nats.Conn.Flush would add a PING/PONG round trip to every line.
func (p *natsPath) Flush() error { return nil }

func (p *natsPath) ReadReply(timeout time.Duration) ([]byte, error) {
	m, err := p.replies.NextMsg(timeout)
	if err != nil {
		return nil, err
	}
	return m.Data, nil
}

func (p *natsPath) Receivers() int { return len(p.subs) }

func (p *natsPath) Receive(i int, fn func(line []byte) error) error {
	errc := make(chan error, 1)
	s, err := p.subs[i].Subscribe(p.subject, func(m *nats.Msg) {
		if err := fn(m.Data); err != nil {
			select {
			case errc <- err:
			default:
			}
		}
	})
	if err != nil {
		return err
	}
	// The lines may outrun the handler for a while; the sender's window bounds how far.
	if err := s.SetPendingLimits(-1, -1); err != nil {
		return err
	}
	return p.wait(p.subs[i], errc)
}

func (p *natsPath) Echo() error {
	errc := make(chan error, 1)
	sub := p.subs[0]
	_, err := sub.Subscribe(p.subject, func(m *nats.Msg) {
		if err := sub.Publish(p.reply, m.Data); err != nil {
			select {
			case errc <- err:
			default:
			}
		}
	})
	if err != nil {
		return err
	}
	return p.wait(sub, errc)
}

// wait blocks the receiving app until the path closes or a handler fails; it also checks
// the subscriber was not cut off as a slow consumer, which would lose lines silently.
func (p *natsPath) wait(sub *nats.Conn, errc chan error) error {
	if err := sub.Flush(); err != nil {
		return err
	}
	select {
	case <-p.done:
		if err := sub.LastError(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
			return err
		}
		return nil
	case err := <-errc:
		return err
	}
}

// Bound does nothing: publishing never blocks (the client buffers, and fails a
// connection that falls too far behind).
func (p *natsPath) Bound(time.Time) error { return nil }

func (p *natsPath) Close() error {
	select {
	case <-p.done:
	default:
		close(p.done)
	}
	p.pub.Close()
	for _, sub := range p.subs {
		sub.Close()
	}
	return nil
}

// openNATSMember connects one all-to-all member: one connection that publishes to subject
// and subscribes to it, without echo, as a podipc app reads every line but its own.
func openNATSMember(url, subject string) (*natsPath, error) {
	c, err := nats.Connect(url, nats.NoReconnect(), nats.Timeout(5*time.Second), nats.NoEcho(), nats.Name("loadtest-member"))
	if err != nil {
		return nil, fmt.Errorf("member app: %w", err)
	}
	return &natsPath{pub: c, subs: []*nats.Conn{c}, subject: subject, done: make(chan struct{})}, nil
}
