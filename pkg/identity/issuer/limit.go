package issuer

import (
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Limit is a token bucket: Burst requests at once, refilled at Rate per second.
type Limit struct {
	Rate  float64
	Burst int
}

// Default per-caller limits. A sidecar asks once per half-life and, after a failure,
// with backoff from one second: a pod is allowed a burst of five, then one request per
// ten seconds. A source address is allowed more, for the pods behind a node's SNAT.
var (
	DefaultSourceLimit = Limit{Rate: 10, Burst: 50}
	DefaultPodLimit    = Limit{Rate: 0.1, Burst: 5}
)

func (l Limit) orDefault(d Limit) Limit {
	if l.Rate <= 0 || l.Burst <= 0 {
		return d
	}
	return l
}

// maxKeys bounds the callers a limiter remembers; idleAfter is when one is forgotten.
const (
	maxKeys   = 100000
	idleAfter = 10 * time.Minute
)

// limiter is a token bucket per key, forgetting keys idle for idleAfter, so that an
// attacker cycling source addresses cannot grow it without bound.
type limiter struct {
	limit Limit
	mu    sync.Mutex
	// buckets holds one bucket per key seen within idleAfter (or until the next sweep).
	buckets   map[string]*bucket
	lastSweep time.Time
}

type bucket struct {
	l    *rate.Limiter
	seen time.Time
}

func newLimiter(l Limit) *limiter {
	return &limiter{limit: l, buckets: map[string]*bucket{}}
}

// allow takes one token from key's bucket at now.
func (l *limiter) allow(key string, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.lastSweep) > idleAfter || len(l.buckets) >= maxKeys {
		for k, b := range l.buckets {
			if now.Sub(b.seen) > idleAfter {
				delete(l.buckets, k)
			}
		}
		l.lastSweep = now
		if len(l.buckets) >= maxKeys {
			return false // every remembered caller is active: refuse newcomers until some go idle
		}
	}
	b := l.buckets[key]
	if b == nil {
		b = &bucket{l: rate.NewLimiter(rate.Limit(l.limit.Rate), l.limit.Burst)}
		l.buckets[key] = b
	}
	b.seen = now
	return b.l.AllowN(now, 1)
}
