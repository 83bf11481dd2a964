package buffer

import "sync/atomic"

// Budget is the sidecar's memory budget: one count of the bytes held by every bounded
// queue of the data plane together (local connection queues with their overflow
// waiting lists, peer link outboxes, the read buffers of open connections), against
// one limit (docs/design.md §8.7). The queues charge it as their bytes change and ask
// it, beside their own bound, whether a message still fits; what does not fit meets
// the channel's overflow policy as a full queue would, with the drop reason
// memory_budget. A nil *Budget is unlimited and charges nothing, so that code without
// a sidecar (tests, the library) pays one nil check.
//
// The count is an atomic integer shared by all goroutines: a queue charges it once per
// batch or per line it already touches, which costs no allocation.
type Budget struct {
	limit int64
	used  atomic.Int64
}

// NewBudget returns a budget of limit bytes; limit ≤ 0 returns nil (unlimited).
func NewBudget(limit int64) *Budget {
	if limit <= 0 {
		return nil
	}
	return &Budget{limit: limit}
}

// Add charges n bytes (n < 0: returns them).
func (b *Budget) Add(n int) {
	if b != nil && n != 0 {
		b.used.Add(int64(n))
	}
}

// Fits reports whether n more bytes stay within the limit.
func (b *Budget) Fits(n int) bool {
	return b == nil || b.used.Load()+int64(n) <= b.limit
}

// Recovered reports whether use has fallen to three quarters of the limit, which ends
// an overflow episode the budget began (as half a queue ends a queue's): between the
// two marks lines are dropped without waiting, so a full budget does not make every
// line wait maxWait.
func (b *Budget) Recovered() bool {
	return b == nil || b.used.Load() <= b.limit/4*3
}

// Limit returns the limit in bytes (0 for a nil budget).
func (b *Budget) Limit() int64 {
	if b == nil {
		return 0
	}
	return b.limit
}

// Used returns the bytes charged now.
func (b *Budget) Used() int64 {
	if b == nil {
		return 0
	}
	return b.used.Load()
}
