package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"time"
)

// ioBufSize is the read and write buffer of every app end and relay hop: big enough for
// any measured line, small enough to be what a careful app would use.
const ioBufSize = 64 << 10

// path is one measured route between a sending app and a receiving app, opened afresh
// for every run. The sending end is driven by one goroutine (Send, Flush, ReadReply), the
// receiving end by another (Receive or Echo).
type path interface {
	// Send queues one line from the sending app; it blocks when the path pushes back.
	Send(line []byte) error
	// Flush pushes queued lines out now; cheap enough to call after every line.
	Flush() error
	// ReadReply waits up to timeout for the next line coming back to the sending app.
	ReadReply(timeout time.Duration) ([]byte, error)
	// Receivers is the number of receiving apps: one, or N−1 in the scale run's fan-out.
	Receivers() int
	// Receive runs receiving app i (0 ≤ i < Receivers): fn sees every line it reads
	// until the path closes or fn fails. Each receiving app runs on its own goroutine.
	Receive(i int, fn func(line []byte) error) error
	// Echo runs the (first) receiving app as an echo server until the path closes.
	Echo() error
	// Bound makes any write of either app that is still blocked at t fail, so that a
	// path that stops moving fails the run instead of hanging it.
	Bound(t time.Time) error
	// Close ends both apps' connections; Receive and Echo then return.
	Close() error
}

// tcpPath is the app ends of a line-over-TCP route (podipc or the plain relay).
type tcpPath struct {
	tx   net.Conn
	txw  *bufio.Writer
	txr  *lineReader
	rx   []net.Conn // the receiving apps' connections
	done chan struct{}
}

func newTCPPath(tx net.Conn, rx ...net.Conn) *tcpPath {
	return &tcpPath{
		tx:   tx,
		txw:  bufio.NewWriterSize(tx, ioBufSize),
		txr:  newLineReader(tx, ioBufSize),
		rx:   rx,
		done: make(chan struct{}),
	}
}

func (p *tcpPath) Send(line []byte) error {
	_, err := p.txw.Write(line)
	return err
}

func (p *tcpPath) Flush() error { return p.txw.Flush() }

func (p *tcpPath) ReadReply(timeout time.Duration) ([]byte, error) {
	if err := p.tx.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return nil, err
	}
	return p.txr.readLine()
}

func (p *tcpPath) Receivers() int { return len(p.rx) }

func (p *tcpPath) Receive(i int, fn func(line []byte) error) error {
	r := newLineReader(p.rx[i], ioBufSize)
	for {
		line, err := r.readLine()
		if err != nil {
			return p.endErr(err)
		}
		if err := fn(line); err != nil {
			return err
		}
	}
}

func (p *tcpPath) Echo() error {
	r := newLineReader(p.rx[0], ioBufSize)
	w := bufio.NewWriterSize(p.rx[0], ioBufSize)
	for {
		line, err := r.readLine()
		if err != nil {
			return p.endErr(err)
		}
		if _, err := w.Write(line); err != nil {
			return p.endErr(err)
		}
		// Batch replies only while more requests are already buffered.
		if r.buffered() == 0 {
			if err := w.Flush(); err != nil {
				return p.endErr(err)
			}
		}
	}
}

// endErr maps the error that ends a receiving loop: none if the path was closed.
func (p *tcpPath) endErr(err error) error {
	select {
	case <-p.done:
		return nil
	default:
		return err
	}
}

func (p *tcpPath) Bound(t time.Time) error {
	errs := make([]error, 0, 1+len(p.rx))
	errs = append(errs, p.tx.SetWriteDeadline(t))
	for _, c := range p.rx {
		errs = append(errs, c.SetWriteDeadline(t))
	}
	return errors.Join(errs...)
}

func (p *tcpPath) Close() error {
	close(p.done)
	if len(p.rx) == 1 && p.rx[0] == p.tx { // one app sending and receiving (dialApp)
		return p.tx.Close()
	}
	return errors.Join(p.tx.Close(), closeAll(p.rx))
}

func closeAll(conns []net.Conn) error {
	errs := make([]error, 0, len(conns))
	for _, c := range conns {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}

// dialBoth connects the sending app to txAddr and one receiving app to each of rxAddrs
// (the podipc shape: every app dials its own sidecar).
func dialBoth(ctx context.Context, txAddr string, rxAddrs ...string) (*tcpPath, error) {
	var d net.Dialer
	// The receivers first, so that they are members' connections before anything is sent.
	var rx []net.Conn
	for _, a := range rxAddrs {
		c, err := d.DialContext(ctx, "tcp", a)
		if err != nil {
			_ = closeAll(rx)
			return nil, fmt.Errorf("receiving app at %s: %w", a, err)
		}
		rx = append(rx, c)
	}
	tx, err := d.DialContext(ctx, "tcp", txAddr)
	if err != nil {
		_ = closeAll(rx)
		return nil, fmt.Errorf("sending app: %w", err)
	}
	return newTCPPath(tx, rx...), nil
}

// dialAccept connects the sending app to txAddr and takes the receiving app's connection
// from ln (the relay shape: the last relay dials the receiving app).
func dialAccept(ctx context.Context, txAddr string, ln *net.TCPListener) (*tcpPath, error) {
	var d net.Dialer
	tx, err := d.DialContext(ctx, "tcp", txAddr)
	if err != nil {
		return nil, fmt.Errorf("sending app: %w", err)
	}
	if err := ln.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		_ = tx.Close()
		return nil, err
	}
	rx, err := ln.Accept()
	if err != nil {
		_ = tx.Close()
		return nil, fmt.Errorf("receiving app: %w", err)
	}
	return newTCPPath(tx, rx), nil
}

// dialApp connects one app that both sends and receives on one connection (the
// all-to-all run: a member's app reads every other member's lines).
func dialApp(ctx context.Context, addr string) (*tcpPath, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("app at %s: %w", addr, err)
	}
	return newTCPPath(c, c), nil
}
