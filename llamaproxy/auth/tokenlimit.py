"""Tokens-per-minute limits per key: the same sliding-window counter as the request limiter.

Requests are admitted while a key's token count in the sliding 60 s window is under its limit;
finished requests ``spend`` what they used (prompt + completion tokens, known only at the end).
"""

from __future__ import annotations

from llamaproxy.auth.ratelimit import SecondsClock, SlidingWindowCounter


class TokenRateLimiter(SlidingWindowCounter):
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
        super().__init__(clock, window, cleanup_interval)

    def check(self, key_id: str, limit: int) -> int | None:
        """None if ``key_id`` may start a request now, else whole seconds (>= 1) to wait."""
        if limit < 1:
            raise ValueError(f"token limit must be at least 1, not {limit}")
        now = self._clock.seconds()
        self._sweep_if_due(now)
        bucket = self._buckets.get(key_id)
        if bucket is None:
            return None
        self._touch(bucket, now)
        if self._estimate(bucket.start, bucket.previous, bucket.current, now) < limit:
            return None
        return self._retry_after(bucket, now, limit)

    def spend(self, key_id: str, tokens: int) -> None:
        """Add the tokens a request of ``key_id`` used."""
        tokens = max(0, int(tokens))
        now = self._clock.seconds()
        self._bucket(key_id, now).current += tokens

    def used(self, key_id: str) -> float:
        """The estimated tokens spent by ``key_id`` in the sliding window ending now."""
        bucket = self._buckets.get(key_id)
        if bucket is None:
            return 0.0
        return self._estimate_later(bucket, self._clock.seconds())
