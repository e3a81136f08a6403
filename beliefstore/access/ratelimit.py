"""Rate limits: a token bucket per name (an API key, a client address), in memory.

The buckets live in the memory of one process: with N API processes, a key may make up
to N times the configured rate in all. The HTTP side (429 with ``Retry-After``) is
:mod:`beliefstore.api.security`.
"""

from __future__ import annotations

import threading
import time


class TokenBucket:
    """``rate`` tokens per second, at most ``burst``; one request takes one token."""

    __slots__ = ("tokens", "updated")

    def __init__(self, burst: float, now: float):
        self.tokens = burst
        self.updated = now


class RateLimiter:
    """Token buckets by name (``key:<key id>``, ``addr:<client>``), in this process's memory.

    Args:
        rate: tokens added per second; 0 or less turns limiting off.
        burst: bucket size (requests allowed at once after a quiet period).
    """

    def __init__(self, rate: float, burst: int, *, max_buckets: int = 100_000):
        self.rate = rate
        self.burst = max(1, burst)
        self.max_buckets = max_buckets
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, name: str, now: float | None = None) -> float | None:
        """Take one token from ``name``'s bucket: ``None`` if allowed, else the seconds
        until a token will be available."""
        if not self.enabled:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            bucket = self._buckets.get(name)
            if bucket is None:
                if len(self._buckets) >= self.max_buckets:
                    self._prune(now)
                bucket = self._buckets[name] = TokenBucket(self.burst, now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return None
            return (1.0 - bucket.tokens) / self.rate

    def exhausted(self, name: str, now: float | None = None) -> float | None:
        """Like :meth:`acquire` without taking a token: seconds to wait, or ``None``."""
        if not self.enabled:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            bucket = self._buckets.get(name)
            if bucket is None:
                return None
            tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            return None if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        full = self.burst / self.rate
        for name in [n for n, b in self._buckets.items() if now - b.updated >= full]:
            del self._buckets[name]
        if len(self._buckets) >= self.max_buckets:  # still full: forget the oldest half
            for name in sorted(self._buckets, key=lambda n: self._buckets[n].updated)[
                    : self.max_buckets // 2]:
                del self._buckets[name]


__all__ = ["RateLimiter", "TokenBucket"]
