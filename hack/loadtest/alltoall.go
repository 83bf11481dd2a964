package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// a2aDrainTimeout bounds how long the all-to-all run waits for the last lines after the
// senders stop: a target that falls behind the offered load on a Block channel is slow,
// not lossy, and shows it as how far behind it was.
const a2aDrainTimeout = 60 * time.Second

// In the all-to-all run a line also names its sender: senderDigits decimal digits after
// the sequence number and its space, so that each receiving app checks every sender's
// sequence on its own.
const senderDigits = 4

func putSender(line []byte, id int) {
	for i := seqDigits + senderDigits; i > seqDigits; i-- {
		line[i] = byte('0' + id%10)
		id /= 10
	}
}

func parseSender(line []byte) (int, bool) {
	if len(line) < seqDigits+1+senderDigits {
		return 0, false
	}
	id := 0
	for _, c := range line[seqDigits+1 : seqDigits+1+senderDigits] {
		if c < '0' || c > '9' {
			return 0, false
		}
		id = id*10 + int(c-'0')
	}
	return id, true
}

// multiChecker is one all-to-all app's verdict on what it reads: a checker per sender.
// Its own lines must never come back.
type multiChecker struct {
	own  int
	chks []*checker
}

func newMultiChecker(own, senders, size int) *multiChecker {
	m := &multiChecker{own: own, chks: make([]*checker, senders)}
	for i := range m.chks {
		m.chks[i] = newChecker(size, false)
	}
	return m
}

func (m *multiChecker) consume(line []byte) error {
	id, ok := parseSender(line)
	if !ok || id >= len(m.chks) || id == m.own {
		return m.chks[m.own].fail(fmt.Errorf("app %d: line %q names no other sender", m.own, line[:min(len(line), seqDigits+1+senderDigits)]))
	}
	return m.chks[id].consume(line)
}

// others returns the checkers of every sender but the app itself.
func (m *multiChecker) others() []*checker {
	out := make([]*checker, 0, len(m.chks)-1)
	for i, c := range m.chks {
		if i != m.own {
			out = append(out, c)
		}
	}
	return out
}

func (m *multiChecker) received() uint64 {
	var n uint64
	for _, c := range m.others() {
		n += c.count.Load()
	}
	return n
}

// allToAllResult is one all-to-all run.
type allToAllResult struct {
	expected  float64 // lines/s the receiving apps should read together: k(k−1)·rate
	delivered float64 // lines/s they read while the senders ran
	written   float64 // lines/s the apps wrote together (k·rate unless the target pushed back)
	sent      uint64
	received  uint64        // lines read by all receiving apps, in the end
	drain     time.Duration // from the senders' end until every line had arrived
	missing   uint64        // lines sent that some receiving app never read
}

// measureAllToAll opens k apps (open(ctx, i) is member i's), each sending rate lines/s
// open loop for dur while reading every other app's lines; then it waits until every
// line arrived everywhere. Any loss, duplicate or reorder per sender fails the run.
// synced, if not nil, is called once every app has heard from every other.
func measureAllToAll(ctx context.Context, open func(ctx context.Context, i int) (path, error), synced func() error, k, size int, rate float64, dur time.Duration) (allToAllResult, error) {
	res := allToAllResult{expected: float64(k*(k-1)) * rate}
	apps := make([]path, 0, k)
	defer func() {
		for _, p := range apps {
			_ = p.Close()
		}
	}()
	mcs := make([]*multiChecker, k)
	recvErr := make(chan error, k)
	for i := range k {
		p, err := open(ctx, i)
		if err != nil {
			return res, err
		}
		apps = append(apps, p)
		if err := p.Bound(time.Now().Add(syncTimeout + dur + a2aDrainTimeout + drainTimeout)); err != nil {
			return res, err
		}
		mcs[i] = newMultiChecker(i, k, size)
		go func() { recvErr <- p.Receive(0, mcs[i].consume) }()
	}
	if err := syncAll(apps, mcs, size, recvErr); err != nil {
		return res, err
	}
	if synced != nil {
		if err := synced(); err != nil {
			return res, err
		}
	}

	sent := make([]atomic.Uint64, k)
	errs := make([]error, k)
	start := time.Now()
	end := start.Add(dur)
	var wg sync.WaitGroup
	for i, p := range apps {
		wg.Go(func() { errs[i] = sendOpenLoop(p, i, size, rate, start, end, &sent[i]) })
	}
	wg.Wait()
	elapsed := time.Since(start)
	var got uint64
	for _, m := range mcs {
		got += m.received()
	}
	res.delivered = float64(got) / elapsed.Seconds()
	if err := errors.Join(errs...); err != nil {
		return res, err
	}
	for i := range sent {
		res.sent += sent[i].Load()
	}
	res.written = float64(res.sent) / elapsed.Seconds()

	stopped := time.Now()
	deadline := stopped.Add(a2aDrainTimeout)
	for {
		res.missing, res.received = 0, 0
		for _, m := range mcs {
			res.received += m.received()
			for j, c := range m.chks {
				if j != m.own {
					res.missing += sent[j].Load() - c.count.Load()
				}
			}
			if err := firstErr(m.chks); err != nil {
				return res, err
			}
		}
		if res.missing == 0 || time.Now().After(deadline) {
			res.drain = time.Since(stopped)
			return res, nil
		}
		select {
		case err := <-recvErr:
			return res, fmt.Errorf("an app's connection ended with %d lines missing: %w", res.missing, err)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// syncAll has every app send sync lines until every app has seen one from each other.
func syncAll(apps []path, mcs []*multiChecker, size int, recvErr <-chan error) error {
	deadline := time.Now().Add(syncTimeout)
	for time.Now().Before(deadline) {
		for i, p := range apps {
			s := newSyncLine(size)
			putSender(s, i)
			if err := p.Send(s); err != nil {
				return fmt.Errorf("sync app %d: %w", i, err)
			}
			if err := p.Flush(); err != nil {
				return fmt.Errorf("sync app %d: %w", i, err)
			}
		}
		done := true
		for _, m := range mcs {
			done = done && allSynced(m.others())
		}
		if done {
			return nil
		}
		select {
		case err := <-recvErr:
			return fmt.Errorf("an app's connection ended during sync: %w", err)
		case <-time.After(syncInterval):
		}
	}
	return errors.New("sync: not every app heard from every other within " + syncTimeout.String())
}

// sendOpenLoop writes app id's lines at rate from start until end, on schedule.
func sendOpenLoop(p path, id, size int, rate float64, start, end time.Time, sent *atomic.Uint64) error {
	line := newLine(size)
	putSender(line, id)
	var n uint64
	for now := time.Now(); now.Before(end); now = time.Now() {
		for due := uint64(rate * now.Sub(start).Seconds()); n < due; n++ {
			putSeq(line, n)
			if err := p.Send(line); err != nil {
				return fmt.Errorf("app %d, seq %d: %w", id, n, err)
			}
		}
		if err := p.Flush(); err != nil {
			return fmt.Errorf("app %d: %w", id, err)
		}
		sent.Store(n)
		time.Sleep(2 * time.Millisecond)
	}
	return nil
}
