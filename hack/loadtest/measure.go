package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"time"
)

// Bounds on every wait, so a broken path fails a run instead of hanging the tool.
const (
	syncTimeout  = 10 * time.Second
	syncInterval = 20 * time.Millisecond
	drainTimeout = 15 * time.Second
)

// throughputResult is one closed-loop run.
type throughputResult struct {
	rate     float64 // data lines per second read by the receiving apps together in the window
	slowest  float64 // data lines per second read by the slowest receiving app in the window
	received uint64  // lines received and checked over the whole run, by all receiving apps
	used     usage   // what the forwarding processes used in the window
}

// usage is what a target's forwarding processes used.
type usage struct {
	cpu      float64 // CPU seconds
	syscalls float64 // read and write system calls
	sender   float64 // CPU seconds of the first process alone (the sending sidecar)
}

// opener opens a fresh path for one run.
type opener func(ctx context.Context) (path, error)

// usageMeter reads what the forwarding processes of a target used so far.
type usageMeter func() usage

// measureThroughput runs one sender as fast as the path lets it for warmup+dur and
// reports the lines per second its receiving apps read during dur (a path may fan out to
// several). The sender keeps at most window bytes in flight (sent, not yet received by the
// slowest receiving app): TCP paths push back long before that; it is what keeps a NATS
// publisher from running without bound ahead of its subscribers, which would end in a
// slow-consumer cut-off rather than a figure. Every line is checked by every receiving
// app; the run fails on any loss or reorder, and unless every sent line arrives at each.
// synced, if not nil, is called once every receiving app has seen a sync line (a sidecar
// counts a sync line reaching a receiving app not yet connected as a drop; counters read
// after synced see only the data lines).
func measureThroughput(ctx context.Context, open opener, meter usageMeter, synced func() error, size int, warmup, dur time.Duration, window int) (throughputResult, error) {
	var res throughputResult
	p, err := open(ctx)
	if err != nil {
		return res, err
	}
	defer func() { _ = p.Close() }()
	if err := p.Bound(time.Now().Add(syncTimeout + warmup + dur + 2*drainTimeout)); err != nil {
		return res, err
	}
	chks := make([]*checker, p.Receivers())
	recvErr := make(chan error, len(chks))
	for i := range chks {
		chks[i] = newChecker(size, false)
		go func() { recvErr <- p.Receive(i, chks[i].consume) }()
	}

	if err := syncPath(p, size, chks, recvErr); err != nil {
		return res, err
	}
	if synced != nil {
		if err := synced(); err != nil {
			return res, err
		}
	}

	line := newLine(size)
	maxInFlight := uint64(max(window/size, 1))
	var sent uint64
	start := time.Now()
	winStart, winEnd := start.Add(warmup), start.Add(warmup+dur)
	var c0, c1 []uint64
	var u0, u1 usage
	var t0, t1 time.Time
	phase := 0 // 0 warming up, 1 measuring, 2 done
	// The window's ends are taken while waiting on the receivers too, so that a sender
	// held back by a slow receiver still measures dur, not the gap between two sends.
	tick := func(now time.Time) {
		switch {
		case phase == 0 && !now.Before(winStart):
			t0, c0, u0 = time.Now(), counts(chks), meter()
			phase = 1
		case phase == 1 && !now.Before(winEnd):
			t1, c1, u1 = time.Now(), counts(chks), meter()
			phase = 2
		}
	}
	for phase < 2 {
		for range 128 {
			putSeq(line, sent)
			if err := p.Send(line); err != nil {
				return res, fmt.Errorf("send seq %d: %w", sent, err)
			}
			sent++
		}
		now := time.Now()
		tick(now)
		for sent-slices.Min(counts(chks)) > maxInFlight {
			tick(time.Now())
			if err := p.Flush(); err != nil {
				return res, err
			}
			if time.Since(now) > drainTimeout {
				return res, fmt.Errorf("receiving apps stuck at %v of %d lines", counts(chks), sent)
			}
			if err := firstErr(chks); err != nil {
				return res, err
			}
			time.Sleep(20 * time.Microsecond)
		}
	}
	if err := p.Flush(); err != nil {
		return res, err
	}
	for i, chk := range chks {
		if err := waitCount(chk, sent, recvErr); err != nil {
			return res, fmt.Errorf("receiving app %d: %w", i, err)
		}
	}
	secs := t1.Sub(t0).Seconds()
	res.slowest = math.Inf(1)
	for i := range chks {
		d := float64(c1[i] - c0[i])
		res.rate += d / secs
		res.slowest = min(res.slowest, d/secs)
		res.received += chks[i].count.Load()
	}
	res.used = usage{cpu: u1.cpu - u0.cpu, syscalls: u1.syscalls - u0.syscalls, sender: u1.sender - u0.sender}
	return res, nil
}

// counts returns the lines each checker has counted so far.
func counts(chks []*checker) []uint64 {
	out := make([]uint64, len(chks))
	for i, c := range chks {
		out[i] = c.count.Load()
	}
	return out
}

func firstErr(chks []*checker) error {
	for _, c := range chks {
		if err := c.Err(); err != nil {
			return err
		}
	}
	return nil
}

// syncPath sends sync lines until every receiving app has seen one, proving the path is
// connected end to end before anything is measured.
func syncPath(p path, size int, chks []*checker, recvErr <-chan error) error {
	err := syncUntil(p, size, func() (bool, error) {
		if allSynced(chks) {
			return true, nil
		}
		select {
		case err := <-recvErr:
			return false, fmt.Errorf("receiving app ended during sync: %w", err)
		case <-time.After(syncInterval):
			return allSynced(chks), nil
		}
	})
	if errors.Is(err, errSyncTimeout) {
		return fmt.Errorf("%w: no line reached every receiving app", err)
	}
	return err
}

// errSyncTimeout: no sync line came through within syncTimeout.
var errSyncTimeout = errors.New("sync: nothing came through within " + syncTimeout.String())

// syncUntil sends a sync line, then asks arrived whether the path is connected, until it is, it
// fails, or syncTimeout has passed.
func syncUntil(p path, size int, arrived func() (bool, error)) error {
	s := newSyncLine(size)
	for deadline := time.Now().Add(syncTimeout); time.Now().Before(deadline); {
		if err := p.Send(s); err != nil {
			return fmt.Errorf("sync: %w", err)
		}
		if err := p.Flush(); err != nil {
			return fmt.Errorf("sync: %w", err)
		}
		if ok, err := arrived(); ok || err != nil {
			return err
		}
	}
	return errSyncTimeout
}

func allSynced(chks []*checker) bool {
	for _, c := range chks {
		select {
		case <-c.synced:
		default:
			return false
		}
	}
	return true
}

// waitCount waits until the receiving app has checked want lines.
func waitCount(chk *checker, want uint64, recvErr <-chan error) error {
	deadline := time.Now().Add(drainTimeout)
	for chk.count.Load() < want {
		if err := chk.Err(); err != nil {
			return err
		}
		select {
		case err := <-recvErr:
			return fmt.Errorf("receiving app ended at %d of %d lines: %w", chk.count.Load(), want, err)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("only %d of %d lines arrived within %s", chk.count.Load(), want, drainTimeout)
		}
		time.Sleep(time.Millisecond)
	}
	return chk.Err()
}

// rttResult is the latency distribution of one ping-pong run.
type rttResult struct {
	p50, p99, max time.Duration
	samples       int
}

// measureRTT sends one line at a time and waits for the receiving app's echo, warmup
// times unrecorded and then samples times recorded, within limit in all. Each echo must
// carry the sequence number just sent.
func measureRTT(ctx context.Context, open opener, size, warmup, samples int, limit time.Duration) (rttResult, error) {
	var res rttResult
	p, err := open(ctx)
	if err != nil {
		return res, err
	}
	defer func() { _ = p.Close() }()
	if err := p.Bound(time.Now().Add(syncTimeout + limit)); err != nil {
		return res, err
	}
	echoErr := make(chan error, 1)
	go func() { echoErr <- p.Echo() }()

	deadline := time.Now().Add(limit)
	if err := syncEcho(p, size); err != nil {
		return res, err
	}
	line := newLine(size)
	rtts := make([]time.Duration, 0, samples)
	for i := range warmup + samples {
		if time.Now().After(deadline) {
			return res, fmt.Errorf("only %d of %d round trips within %s", len(rtts), samples, limit)
		}
		putSeq(line, uint64(i))
		t := time.Now()
		if err := p.Send(line); err != nil {
			return res, err
		}
		if err := p.Flush(); err != nil {
			return res, err
		}
		reply, err := readDataReply(p, time.Until(deadline))
		d := time.Since(t)
		if err != nil {
			select {
			case e := <-echoErr:
				err = fmt.Errorf("%w (echo app: %w)", err, e)
			default:
			}
			return res, fmt.Errorf("round trip %d: %w", i, err)
		}
		if seq, ok := parseSeq(reply); !ok || seq != uint64(i) || len(reply) != size {
			return res, fmt.Errorf("round trip %d: echo %q is not the line sent", i, reply[:min(len(reply), seqDigits)])
		}
		if i >= warmup {
			rtts = append(rtts, d)
		}
	}
	slices.Sort(rtts)
	res.samples = len(rtts)
	res.p50 = rtts[len(rtts)/2]
	res.p99 = rtts[len(rtts)*99/100]
	res.max = rtts[len(rtts)-1]
	return res, nil
}

// syncEcho sends sync lines until one comes back, proving both directions are connected.
func syncEcho(p path, size int) error {
	err := syncUntil(p, size, func() (bool, error) {
		r, err := p.ReadReply(syncInterval * 5)
		return err == nil && len(r) > 0 && r[0] == syncByte, nil
	})
	if errors.Is(err, errSyncTimeout) {
		return fmt.Errorf("%w: no echo", err)
	}
	return err
}

// readDataReply returns the next echoed line that is not a late sync line.
func readDataReply(p path, timeout time.Duration) ([]byte, error) {
	for {
		r, err := p.ReadReply(timeout)
		if err != nil {
			return nil, err
		}
		if len(r) > 0 && r[0] == syncByte {
			continue
		}
		return r, nil
	}
}

// overloadResult is one open-loop run.
type overloadResult struct {
	offered  float64 // the rate asked for, lines/s
	achieved float64 // the rate the sending app managed to write, lines/s
	sent     uint64
	received uint64   // by all receiving apps together
	each     []uint64 // by each receiving app
	rate     float64  // lines/s the receiving apps read together while the sender ran
}

// missing is the lines sent that some receiving app did not read, summed over them.
func (r overloadResult) missing() uint64 { return r.sent*uint64(len(r.each)) - r.received }

// measureOverload writes lines at rate (open loop: on schedule, not waiting for the
// receiver) for dur, then waits until nothing more arrives. Lines may be lost (a bounded
// queue drops), but a sequence number going backwards is still an error. If the path
// pushes back, the sender's writes block and it falls behind the schedule; achieved says
// by how much.
//
// readRate, if not 0, makes every receiving app a slow reader: it reads at most readRate
// lines per second, so the receiving sidecar's queue for it fills.
func measureOverload(ctx context.Context, open opener, synced func() error, size int, rate, readRate float64, dur time.Duration) (overloadResult, error) {
	res := overloadResult{offered: rate}
	p, err := open(ctx)
	if err != nil {
		return res, err
	}
	defer func() { _ = p.Close() }()
	if err := p.Bound(time.Now().Add(syncTimeout + dur + 2*drainTimeout)); err != nil {
		return res, err
	}
	chks := make([]*checker, p.Receivers())
	recvErr := make(chan error, len(chks))
	for i := range chks {
		chks[i] = newChecker(size, true)
		consume := chks[i].consume
		if readRate > 0 {
			consume = slowly(consume, readRate)
		}
		go func() { recvErr <- p.Receive(i, consume) }()
	}
	if err := syncPath(p, size, chks, recvErr); err != nil {
		return res, err
	}
	if synced != nil {
		if err := synced(); err != nil {
			return res, err
		}
	}
	received := func() uint64 {
		var n uint64
		for _, c := range chks {
			n += c.count.Load()
		}
		return n
	}
	checkErr := func() error {
		for _, c := range chks {
			if err := c.Err(); err != nil {
				return err
			}
		}
		return nil
	}

	line := newLine(size)
	start := time.Now()
	end := start.Add(dur)
	for now := start; now.Before(end); now = time.Now() {
		due := uint64(rate * now.Sub(start).Seconds())
		for res.sent < due {
			putSeq(line, res.sent)
			if err := p.Send(line); err != nil {
				return res, fmt.Errorf("send seq %d: %w", res.sent, err)
			}
			res.sent++
			// A sender that has fallen behind must still stop on time.
			if res.sent%1024 == 0 && !time.Now().Before(end) {
				break
			}
		}
		if err := p.Flush(); err != nil {
			return res, err
		}
		if err := checkErr(); err != nil {
			return res, err
		}
		time.Sleep(time.Until(now.Add(time.Millisecond)))
	}
	elapsed := time.Since(start)
	res.achieved = float64(res.sent) / elapsed.Seconds()
	res.rate = float64(received()) / elapsed.Seconds()

	// Drain: wait until a second passes with nothing new, within drainTimeout.
	all := res.sent * uint64(len(chks))
	deadline := time.Now().Add(drainTimeout)
	for last := uint64(0); time.Now().Before(deadline); {
		time.Sleep(time.Second)
		n := received()
		if n == last || n == all {
			break
		}
		last = n
	}
	for _, c := range chks {
		res.each = append(res.each, c.count.Load())
		res.received += res.each[len(res.each)-1]
	}
	return res, checkErr()
}

// slowly makes consume read at most readRate lines per second.
func slowly(consume func([]byte) error, readRate float64) func([]byte) error {
	var n uint64
	var start time.Time
	return func(line []byte) error {
		if err := consume(line); err != nil {
			return err
		}
		if n == 0 {
			start = time.Now()
		}
		n++
		if n%64 == 0 {
			time.Sleep(time.Until(start.Add(time.Duration(float64(n) / readRate * float64(time.Second)))))
		}
		return nil
	}
}
