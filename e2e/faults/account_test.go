//go:build e2efaults

package faults

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
)

// kind is what a fault does to the victims, and so which guarantee of docs/guarantees.md the
// lines must keep.
type kind int

const (
	// network: the victims' links are impaired or reset, every sidecar stays alive: guarantee
	// (a), exactly once and in order, for every pair.
	network kind = iota
	// sidecarKill: the victims' sidecars are SIGKILLed and restarted: as receivers (b) no
	// duplicate and every missing line counted; as senders (c) only what was unacknowledged
	// at each kill is missing (one run of lines per kill); between survivors, (a).
	sidecarKill
	// podDelete: the victims are deleted gracefully: their sidecars drain, so every line they
	// sent before is delivered; between survivors, (a).
	podDelete
	// podForceDelete: the victims are deleted with grace 0: what they sent may lose its tail,
	// never a line in the middle; between survivors, (a).
	podForceDelete
	// controlPlane: kube-apiserver, etcd or the controller is down: no member changes, so (a)
	// for every pair, and membership catches up afterwards.
	controlPlane
)

// result is one row of docs/reliability.md: one fault on one channel.
type result struct {
	fault, channel string
	sent           int // lines the senders wrote during the fault window
	delivered      int // deliveries (Broadcast: per receiver; AnyOne: lines received at all)
	lost           int // deliveries expected and not made
	uncountedOK    int // of lost: lines a dead sending sidecar had not had acknowledged (c)
	unaddressed    int // Broadcast lines written while the receiver was not Ready (not a member)
	dropped        map[string]float64
	duplicated     int
	reordered      int
	catchUp        time.Duration // fault end → every receiver has every sender's line of then
	membership     time.Duration // fault end → both Channels list every pod ready
	violations     []string
	notes          []string
}

// unreadySlack widens the windows in which a receiver was not Ready by 3 s of lines either
// way: readiness reaches the API server (kubelet) and then the sidecars (EndpointSlice watch)
// a moment after it changes, and the suite polls once a second.
const unreadySlack = 3 * rate

// window is what one sender wrote on one channel during the fault: SEQs from+1 … to.
type window struct{ from, to int }

func (w window) size() int { return max(0, w.to-w.from) }

// account counts the lines of channel ch written between first and end (the poll at which
// traffic was back to its rate) as the last polls saw them, and judges them by k.
func account(k kind, ch string, victims map[string]bool, kills map[string]int, first, end *snapshot, tl *tally) result {
	r := result{channel: ch, dropped: map[string]float64{}}
	for key, v := range tl.dropped {
		if c, reason, _ := strings.Cut(key, "/"); c == ch && v > 0 {
			r.dropped[reason] = v
		}
	}
	counted := 0
	for _, from := range slices.Sorted(maps.Keys(first.pods)) {
		w, ok := senderWindow(ch, from, first, end, tl)
		if !ok {
			continue
		}
		if w.to < w.from {
			r.violations = append(r.violations, fmt.Sprintf("%s: its app restarted (sent %d, was %d)", from, w.to, w.from))
			continue
		}
		r.sent += w.size()
		if ch == bcast {
			counted += r.broadcastFrom(k, from, w, victims, kills[from], first, tl)
		} else {
			counted += r.anyOneFrom(k, from, w, victims, kills[from], first, tl)
		}
	}
	var total float64
	for _, v := range r.dropped {
		total += v
	}
	if float64(counted) > total {
		r.violations = append(r.violations, fmt.Sprintf("%d lines lost and only %v counted as dropped: lines lost without being counted", counted, total))
	}
	return r
}

// senderWindow: a deleted sender's window ends at the last line it was seen to have written.
func senderWindow(ch, from string, first, end *snapshot, tl *tally) (window, bool) {
	start, ok := first.pods[from].report.Sent[ch]
	if !ok {
		return window{}, false
	}
	last := end.report(from)
	if last == nil {
		last = tl.latest[from].report
	}
	return window{start, last.Sent[ch]}, true
}

// broadcastFrom judges every receiver of one sender's window and returns the lines lost that
// must have been counted.
func (r *result) broadcastFrom(k kind, from string, w window, victims map[string]bool, kills int, first *snapshot, tl *tally) int {
	mustCount := 0
	for _, to := range slices.Sorted(maps.Keys(first.pods)) {
		if to == from || !sameApp(from, to) {
			continue
		}
		if victims[to] && (k == podDelete || k == podForceDelete) {
			continue // it is gone: what it heard last is not its end
		}
		now := tl.latest[to].report.Recv[bcast][from]
		before := first.pods[to].report.Recv[bcast][from]
		var missing []int
		unaddressed := 0
		for _, n := range missingIn(&now, w) {
			if tl.whileUnready(to, from, n, unreadySlack) {
				unaddressed++
			} else {
				missing = append(missing, n)
			}
		}
		dups, reord := now.Duplicates-before.Duplicates, now.Reordered-before.Reordered
		r.unaddressed += unaddressed
		r.delivered += w.size() - len(missing) - unaddressed
		r.lost += len(missing)
		r.duplicated += dups
		r.reordered += reord
		pair := fmt.Sprintf("%s→%s", from, to)
		switch {
		case k == sidecarKill && victims[from]:
			mustCount += r.deadSender(missing, kills)
			r.noDuplicates(pair, dups)
		case k == sidecarKill && victims[to]:
			mustCount += len(missing)
			r.noDuplicates(pair, dups)
		case k == podForceDelete && victims[from]:
			if !tailOnly(missing, &now, w) {
				r.violatef("%s: lines missing %v before lines that arrived: not only the unacknowledged tail", pair, runsOf(missing))
			}
			r.uncountedOK += len(missing)
			r.noDuplicates(pair, dups)
		default:
			r.exactlyOnceInOrder(pair, missing, dups, reord)
			mustCount += len(missing)
		}
	}
	return mustCount
}

// anyOneFrom judges one sender's window over all receivers together.
func (r *result) anyOneFrom(k kind, from string, w window, victims map[string]bool, kills int, first *snapshot, tl *tally) int {
	victim := victims[from]
	counts := make([]int, w.size())
	dupsWithin, reord := 0, 0
	for name, st := range tl.latest {
		if sameApp(from, name) {
			f := st.report.Recv[anyone][from]
			for i := range counts {
				if f.has(w.from + 1 + i) {
					counts[i]++
				}
			}
			if b := first.report(name); b != nil {
				dupsWithin += f.Duplicates - b.Recv[anyone][from].Duplicates
				reord += f.Reordered - b.Recv[anyone][from].Reordered
			} else {
				dupsWithin += f.Duplicates
				reord += f.Reordered
			}
		}
	}
	var missing []int
	dups, unobserved := dupsWithin, 0
	for i, c := range counts {
		if n := w.from + 1 + i; c == 0 && (k == podDelete || k == podForceDelete) && tl.deliveredUnseen(n, from, victims) {
			unobserved++
		} else if c == 0 {
			missing = append(missing, n)
		}
		dups += max(0, c-1)
	}
	r.unaddressed += unobserved
	r.delivered += w.size() - len(missing) - unobserved
	r.lost += len(missing)
	r.duplicated += dups
	r.reordered += reord
	pair := from + "→any"
	if len(missing) > 0 {
		r.notes = append(r.notes, fmt.Sprintf("%s: missing %v (window %d-%d; %s)", pair, runsOf(missing), w.from+1, w.to,
			tl.whereAround(from, missing, victims)))
	}
	switch {
	case (k == sidecarKill) && victim:
		return r.deadSender(missing, kills)
	case k == podForceDelete && victim:
		delivered := &flowReport{seen: bitmap(counts, w)}
		if !tailOnly(missing, delivered, w) {
			r.violatef("%s: lines missing %v before lines that arrived: not only the unacknowledged tail", pair, runsOf(missing))
		}
		r.uncountedOK += len(missing)
	case k == sidecarKill || k == podDelete || k == podForceDelete:
		// A receiver's sidecar restarted or left: its unacknowledged lines are rerouted,
		// at-least-once (docs/guarantees.md), so duplicates are allowed; losses are counted.
		return len(missing)
	default:
		r.exactlyOnceInOrder(pair, missing, dups, reord)
	}
	return len(missing)
}

// deliveredUnseen: an AnyOne line n of from may have reached a deleted victim after the
// victim's last poll (within its grace period and the slack), where no poll could see it.
func (t *tally) deliveredUnseen(n int, from string, victims map[string]bool) bool {
	for v := range victims {
		if last, ok := t.heardAt[v+"|"+from]; ok && v != from && sameApp(v, from) && n > last-unreadySlack && n <= last+(10*rate)+unreadySlack {
			return true
		}
	}
	return false
}

// deadSender splits what is missing from a sender whose sidecar died kills times: the kills
// longest runs of missing lines are what it had not had acknowledged when it died (c); it
// returns how many other lines are missing, which must have been counted.
func (r *result) deadSender(missing []int, kills int) int {
	runs := runLengths(missing)
	slices.SortFunc(runs, func(a, b int) int { return b - a })
	rest := 0
	for i, n := range runs {
		if i < kills {
			r.uncountedOK += n
		} else {
			rest += n
		}
	}
	return rest
}

func runLengths(missing []int) []int {
	var out []int
	for i, n := range missing {
		if i == 0 || n != missing[i-1]+1 {
			out = append(out, 0)
		}
		out[len(out)-1]++
	}
	return out
}

func (r *result) violatef(format string, args ...any) {
	r.violations = append(r.violations, fmt.Sprintf(format, args...))
}

func (r *result) noDuplicates(pair string, dups int) {
	if dups != 0 {
		r.violatef("%s: %d lines delivered twice", pair, dups)
	}
}

func (r *result) exactlyOnceInOrder(pair string, missing []int, dups, reord int) {
	if len(missing) != 0 {
		r.violatef("%s: %d lines lost %v", pair, len(missing), runsOf(missing))
	}
	r.noDuplicates(pair, dups)
	if reord != 0 {
		r.violatef("%s: %d lines out of order", pair, reord)
	}
}

func missingIn(f *flowReport, w window) []int {
	var out []int
	for n := w.from + 1; n <= w.to; n++ {
		if !f.has(n) {
			out = append(out, n)
		}
	}
	return out
}

// tailOnly: no line of the window arrived after the first missing one.
func tailOnly(missing []int, f *flowReport, w window) bool {
	if len(missing) == 0 {
		return true
	}
	for n := missing[0]; n <= w.to; n++ {
		if f.has(n) {
			return false
		}
	}
	return true
}

func bitmap(counts []int, w window) []byte {
	b := make([]byte, (w.to)/8+1)
	for i, c := range counts {
		if n := w.from + 1 + i; c > 0 {
			b[n/8] |= 1 << (n % 8)
		}
	}
	return b
}

// runsOf renders missing SEQs as runs "a-b".
func runsOf(missing []int) []string {
	var out []string
	for i := 0; i < len(missing); {
		j := i
		for j+1 < len(missing) && missing[j+1] == missing[j]+1 {
			j++
		}
		if i == j {
			out = append(out, fmt.Sprint(missing[i]))
		} else {
			out = append(out, fmt.Sprintf("%d-%d", missing[i], missing[j]))
		}
		i = j + 1
	}
	return out
}

// whereAround is the evidence for missing AnyOne lines of from: which pod received the
// lines just before and after each (at most three), and what from had sent at each
// victim's last poll.
func (t *tally) whereAround(from string, missing []int, victims map[string]bool) string {
	who := func(n int) string {
		var at []string
		for name, st := range t.latest {
			if st.report == nil {
				continue
			}
			if f, ok := st.report.Recv[anyone][from]; ok && f.has(n) {
				at = append(at, name)
			}
		}
		slices.Sort(at)
		return fmt.Sprintf("%d at %v", n, at)
	}
	var parts []string
	for _, n := range missing[:min(3, len(missing))] {
		parts = append(parts, who(n-1)+", "+who(n+1))
	}
	for v := range victims {
		if last, ok := t.heardAt[v+"|"+from]; ok {
			parts = append(parts, fmt.Sprintf("sent %d at %s's last poll", last, v))
		}
	}
	return strings.Join(parts, "; ")
}
