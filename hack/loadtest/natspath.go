package main

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
)

// natsPath is the NATS route: a publishing client and a subscribing client, each with its
// own connection to one nats-server. Lines travel as message payloads, '\n' included,
// so the bytes per message equal the bytes per line on the TCP paths.
type natsPath struct {
	pub, sub *nats.Conn
	subject  string // sending app → receiving app
	reply    string // receiving app → sending app (the echo)
	replies  *nats.Subscription
	done     chan struct{}
}

// natsRun numbers the subjects of each opened path, so a late message of an earlier run
// can never reach a later one.
var natsRun atomic.Uint64

func openNATS(url string) (*natsPath, error) {
	opts := []nats.Option{nats.NoReconnect(), nats.Timeout(5 * time.Second)}
	pub, err := nats.Connect(url, append(opts, nats.Name("loadtest-sender"))...)
	if err != nil {
		return nil, fmt.Errorf("sending app: %w", err)
	}
	sub, err := nats.Connect(url, append(opts, nats.Name("loadtest-receiver"))...)
	if err != nil {
		pub.Close()
		return nil, fmt.Errorf("receiving app: %w", err)
	}
	n := natsRun.Add(1)
	p := &natsPath{
		pub:     pub,
		sub:     sub,
		subject: fmt.Sprintf("bench.%d.line", n),
		reply:   fmt.Sprintf("bench.%d.echo", n),
		done:    make(chan struct{}),
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

func (p *natsPath) Receive(fn func(line []byte) error) error {
	errc := make(chan error, 1)
	s, err := p.sub.Subscribe(p.subject, func(m *nats.Msg) {
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
	return p.wait(errc)
}

func (p *natsPath) Echo() error {
	errc := make(chan error, 1)
	_, err := p.sub.Subscribe(p.subject, func(m *nats.Msg) {
		if err := p.sub.Publish(p.reply, m.Data); err != nil {
			select {
			case errc <- err:
			default:
			}
		}
	})
	if err != nil {
		return err
	}
	return p.wait(errc)
}

// wait blocks the receiving app until the path closes or a handler fails; it also checks
// the subscriber was not cut off as a slow consumer, which would lose lines silently.
func (p *natsPath) wait(errc chan error) error {
	if err := p.sub.Flush(); err != nil {
		return err
	}
	select {
	case <-p.done:
		if err := p.sub.LastError(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
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
	p.sub.Close()
	return nil
}
