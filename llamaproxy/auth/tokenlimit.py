"""Tokens-per-minute limits per key: the same sliding-window counter as the request limiter.

Requests are admitted while a key's token count in the sliding 60 s window is under its limit;
finished requests ``spend`` what they used (prompt + completion tokens, known only at the end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llamaproxy.auth.ratelimit import SecondsClock


@dataclass(slots=True)
class _TokenBucket:
    start: float
    previous: int
    current: int
    last_seen: float


class TokenRateLimiter:
    """Tokens per minute per key_id: a sliding-window counter (see llamaproxy.auth.ratelimit).

    A request may start while the key's estimated spend over the last ``window`` seconds,
    ``E = previous * (W - e) / W + current``, is below its limit; the tokens it used are added
    with :meth:`spend` when it ends (they are unknown before), so one request can overshoot the
    limit, and the next ones wait until the window has forgotten enough. O(1) per call; four
    scalars per key; buckets idle for two windows are purged lazily.
    """

    def __init__(
        self, clock: SecondsClock, window: float = 60.0, cleanup_interval: float = 300.0
    ) -> None:
        if not window > 0:
            raise ValueError("window must be positive")
        self._clock = clock
        self.window = float(window)
        self.cleanup_interval = float(cleanup_interval)
        self._buckets: dict[str, _TokenBucket] = {}
        self._last_sweep = clock.seconds()

    def __len__(self) -> int:
        """The number of buckets held."""
        return len(self._buckets)

    def check(self, key_id: str, limit: int) -> int | None:
        """None if ``key_id`` may start a request now, else whole seconds (>= 1) to wait."""
        if limit < 1:
            raise ValueError(f"token limit must be at least 1, not {limit}")
        now = self._clock.seconds()
        if now - self._last_sweep >= self.cleanup_interval or now < self._last_sweep:
            self.purge()
        bucket = self._buckets.get(key_id)
        if bucket is None:
            return None
        self._roll(bucket, now)
        bucket.last_seen = now
        if self._estimate(bucket.start, bucket.previous, bucket.current, now) < limit:
            return None
        return self._retry_after(bucket, now, limit)

    def spend(self, key_id: str, tokens: int) -> None:
        """Add the tokens a request of ``key_id`` used."""
        tokens = max(0, int(tokens))
        now = self._clock.seconds()
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = _TokenBucket(now, 0, 0, now)
        else:
            self._roll(bucket, now)
            bucket.last_seen = now
        bucket.current += tokens

    def used(self, key_id: str) -> float:
        """The estimated tokens spent by ``key_id`` in the sliding window ending now."""
        bucket = self._buckets.get(key_id)
        if bucket is None:
            return 0.0
        now = self._clock.seconds()
        start, previous, current = self._rolled(bucket, now)
        return self._estimate(start, previous, current, now)

    def purge(self) -> int:
        """Drop buckets idle for more than two windows; return how many were dropped."""
        now = self._clock.seconds()
        self._last_sweep = now
        horizon = 2 * self.window
        kept = {k: b for k, b in self._buckets.items() if now - b.last_seen <= horizon}
        dropped = len(self._buckets) - len(kept)
        if dropped:
            self._buckets = kept
        return dropped

    def _rolled(self, bucket: _TokenBucket, now: float) -> tuple[float, int, int]:
        elapsed = now - bucket.start
        if elapsed < 0:  # clock went back: restart the window here, forgetting nothing
            return now, bucket.previous, bucket.current
        if elapsed < self.window:
            return bucket.start, bucket.previous, bucket.current
        if elapsed < 2 * self.window:
            return bucket.start + self.window, bucket.current, 0
        return now, 0, 0

    def _roll(self, bucket: _TokenBucket, now: float) -> None:
        bucket.start, bucket.previous, bucket.current = self._rolled(bucket, now)

    def _estimate(self, start: float, previous: int, current: int, now: float) -> float:
        offset = min(max(now - start, 0.0), self.window)
        return previous * ((self.window - offset) / self.window) + current

    def _estimate_later(self, bucket: _TokenBucket, when: float) -> float:
        start, previous, current = self._rolled(bucket, when)
        return self._estimate(start, previous, current, when)

    def _retry_after(self, bucket: _TokenBucket, now: float, limit: int) -> int:
        """The smallest whole r >= 1 with E(now + r) < limit (bucket rolled to now)."""
        window = self.window
        offset = min(max(now - bucket.start, 0.0), window)
        if bucket.current < limit:
            delay = window - offset - window * (limit - bucket.current) / bucket.previous
        else:
            delay = 2 * window - offset - window * limit / bucket.current
        retry = max(1, math.floor(delay) + 1)
        while retry > 1 and self._estimate_later(bucket, now + retry - 1) < limit:
            retry -= 1
        while self._estimate_later(bucket, now + retry) >= limit:
            retry += 1
        return retry
