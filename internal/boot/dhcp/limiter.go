package dhcp

import (
	"sync/atomic"
	"time"
)

// logLimiter keeps per-packet logging from becoming a denial of service: a network full of
// machines we don't manage (or one spoofing random MACs) must not flood the logs or slow the
// hot path. Both checks are lock-free.
type logLimiter struct {
	// seen remembers MACs already logged, one per slot by hash. It is lossy on purpose: a
	// fixed table can't be grown by an attacker, and a MAC evicted by a collision is merely
	// logged again.
	seen   [4096]atomic.Uint64
	limit  int64
	window atomic.Int64 // current second (Unix time)
	count  atomic.Int64 // lines logged in it
}

func newLogLimiter(perSecond int) *logLimiter {
	return &logLimiter{limit: int64(perSecond)}
}

// firstTime reports whether key (a MAC) has not been seen before, and remembers it.
func (l *logLimiter) firstTime(key uint64) bool {
	v := key + 1 // 0 marks an empty slot
	slot := &l.seen[(key*0x9E3779B97F4A7C15)>>52]
	return slot.Swap(v) != v
}

// allow reports whether one more line may be logged this second.
func (l *logLimiter) allow() bool {
	now := time.Now().Unix()
	if w := l.window.Load(); w != now && l.window.CompareAndSwap(w, now) {
		l.count.Store(0)
	}
	return l.count.Add(1) <= l.limit
}
