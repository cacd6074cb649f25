"""Per-key rate limiting: a sliding-window counter and its Retry-After / X-RateLimit-* arithmetic.

Each key_id has one bucket of four scalars, whatever its limit: the start ``s`` of its current
fixed window of length ``W``, the count ``p`` allowed in the previous window, the count ``c``
allowed so far in the current one, and when the key was last seen. A check costs O(1) time; there
is no list of timestamps (the older gateway's list made each check O(limit) and fell from about
990 to 440 requests/s under one minute of load).

Windows are per key: a key's first window starts at its first request, the next one ``W`` later,
and so on; after two idle windows (both counts would be 0) the next request starts a fresh window.
So a new or long-idle key gets exactly ``limit`` requests in its first ``W`` seconds.

The formulas, at time ``t`` with offset ``e = t - s`` into the current window (``0 <= e <= W``):

- Rolling over: when ``W <= t - s < 2W`` the current count becomes the previous one
  (``p, c = c, 0``; ``s += W``); when ``t - s >= 2W`` both are 0 and ``s = t``.
- Estimate of the requests in the sliding window ``(t - W, t]``, assuming the previous window's
  requests were spread evenly over it::

      E(t) = p * (W - e) / W + c

- Allowed iff ``E(t) < limit``; then ``c += 1``. A refused request changes only the key's
  last-seen time. Since ``E >= c``, ``c <= limit`` in every window, so at most ``2 * limit``
  requests are allowed in any span of ``W`` seconds (it meets at most two windows): the
  counter's known worst case. The limit is not stored: a new limit for a key (after a reload)
  applies to its existing counts.
- ``remaining`` = further requests allowed right now = the smallest ``k >= 0`` with
  ``E + k >= limit`` (``E`` after counting this request) = ``max(0, ceil(limit - E))``.
- ``retry_after`` (refused only): without new requests ``E`` never increases, so there is a time
  ``d`` after which ``E(t + d) < limit``:

  - ``c < limit``: it happens in the current window, as the previous window's share decays:
    ``p * (W - e - d) / W + c < limit``  ⇔  ``d > W - e - W * (limit - c) / p``
    (``p > 0``, or the request would have been allowed).
  - ``c >= limit``: only after the current count has become ``p`` in the next window and decayed:
    ``(W - e)`` to the boundary, then ``c * (W - e') / W < limit``  ⇔  ``e' > W - W * limit / c``,
    so ``d > 2W - e - W * limit / c``. (With ``c == limit`` that is the boundary itself: the
    oldest requests leave at the end of the current window.)

  The comparison is strict, so ``retry_after = floor(d) + 1`` (at least 1): the first whole
  second at which a request *is* allowed; one second earlier (when that is still >= 1 s away) it
  is refused. E.g. a burst of ``limit`` at ``t = 0`` is refused until ``t = 60``
  (``E(60) = limit``) and allowed again at ``t = 61``: ``Retry-After: 61``.
- ``reset`` = whole seconds until ``E`` reaches 0: ``ceil(2W - e)`` when ``c > 0`` (``c`` decays
  through the next window), ``ceil(W - e)`` when only ``p > 0``, else 0; so ``0 <= reset <= 2W``.

The closed forms are then checked against ``E`` itself (one or two O(1) evaluations), so float
rounding can never make ``remaining`` or ``retry_after`` disagree with what ``check`` will do.

Clock jumps: a clock that goes backwards past a key's window start restarts that window at the
new time with its counts kept and the previous count at full weight (the conservative choice);
offsets are never negative. A forward jump just ages the counts.

Memory: buckets idle for more than ``2W`` (nothing left to remember) are purged by an O(n) sweep
run lazily from ``check``, at most once per ``cleanup_interval`` (amortised O(1) per request), or
by ``purge()``. State lives in the limiter, so it survives key reloads.

The machinery (buckets, rolling, ``E``, ``retry_after``, purging) is :class:`SlidingWindowCounter`;
:class:`RateLimiter` counts requests with it and ``llamaproxy.auth.tokenlimit.TokenRateLimiter``
counts tokens.

Cost (micro-check with timeit on the dev container, CPython 3.11; informative, not a test):
``check`` takes about 2.6 µs when allowed and 3.5 µs when refused, the same for limit 10 and
limit 1 000 000 and with 1 or 100 000 buckets held; a sweep of 100 000 idle buckets about 8 ms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol


class SecondsClock(Protocol):
    """Anything with ``seconds()`` (an ``IReactorTime``, ``twisted.internet.task.Clock``)."""

    def seconds(self) -> float:
        """The current time in seconds."""
        ...


class RateDecision(NamedTuple):
    """The outcome of one check, with the numbers for the response headers.

    (Immutable; a NamedTuple rather than a frozen dataclass, which cost about 8 500
    instructions to make, once per request.)
    """

    allowed: bool
    limit: int
    remaining: int  # requests still allowed in the window after this one (>= 0)
    reset: int  # whole seconds until the key's window is fully clear again (>= 0)
    retry_after: int | None  # when refused: whole seconds (>= 1) until a request is allowed

    def headers(self) -> tuple[tuple[str, str], ...]:
        """X-RateLimit-Limit, -Remaining, -Reset, plus Retry-After when refused."""
        headers: tuple[tuple[str, str], ...] = (
            ("X-RateLimit-Limit", str(self.limit)),
            ("X-RateLimit-Remaining", str(self.remaining)),
            ("X-RateLimit-Reset", str(self.reset)),
        )
        if self.retry_after is not None:
            headers += (("Retry-After", str(self.retry_after)),)
        return headers

    def fields(self) -> tuple[tuple[bytes, bytes], ...]:
        """``headers()`` as response header fields in bytes (what ``set_headers`` takes): the
        same names and the same digits, the limit's formatted once per limit."""
        _allowed, limit, remaining, reset, retry_after = self
        text = _LIMIT_TEXT.get(limit)
        if text is None:
            text = _limit_text(limit)
        fields: tuple[tuple[bytes, bytes], ...] = (
            (b"X-RateLimit-Limit", text),
            (b"X-RateLimit-Remaining", b"%d" % remaining),
            (b"X-RateLimit-Reset", b"%d" % reset),
        )
        if retry_after is not None:
            fields += ((b"Retry-After", b"%d" % retry_after),)
        return fields


#: X-RateLimit-Limit's value by limit: a key's limit is formatted once, not per request.
_LIMIT_TEXT: dict[int, bytes] = {}


def _limit_text(limit: int) -> bytes:
    """``limit`` in ASCII digits, remembered in ``_LIMIT_TEXT`` (at most 256 limits: started
    over when full; the key file and config give a handful)."""
    if len(_LIMIT_TEXT) >= 256:
        _LIMIT_TEXT.clear()
    text = _LIMIT_TEXT[limit] = b"%d" % limit
    return text


#: ``RateDecision(*values)`` without the generated ``__new__``'s frame.
_new_decision = tuple.__new__
_ceil = math.ceil


@dataclass(slots=True)
class _Bucket:
    """One key's counter state: window start, previous and current counts, last use."""

    start: float
    previous: int
    current: int
    last_seen: float


class SlidingWindowCounter:
    """Per-key sliding-window counters: the machinery shared by the request and token limiters.

    Holds one :class:`_Bucket` per key_id and implements the rolling, the estimate ``E(t)``, the
    exact ``retry_after`` and the purge of idle buckets described in this module's docstring.
    What is counted (requests, tokens) and when is up to the subclass.
    """

    def __init__(
        self, clock: SecondsClock, window: float = 60.0, cleanup_interval: float = 300.0
    ) -> None:
        self._check_settings(window, cleanup_interval)
        self._clock = clock
        self.window = float(window)
        self.cleanup_interval = float(cleanup_interval)
        self._buckets: dict[str, _Bucket] = {}
        self._last_sweep = clock.seconds()

    def _check_settings(self, window: float, cleanup_interval: float) -> None:
        """Refuse a window that is not positive (subclasses may check more)."""
        if not window > 0:
            raise ValueError("window must be positive")

    def now(self) -> float:
        """The limiter's clock, in seconds (what a charge is dated with)."""
        return self._clock.seconds()

    def __len__(self) -> int:
        """The number of buckets held."""
        return len(self._buckets)

    def purge(self) -> int:
        """Drop buckets idle for more than two windows; return how many were dropped."""
        now = self._clock.seconds()
        self._last_sweep = now
        horizon = 2 * self.window
        kept = {key: b for key, b in self._buckets.items() if now - b.last_seen <= horizon}
        dropped = len(self._buckets) - len(kept)
        if dropped:
            self._buckets = kept  # a new dict: deleting from the old one would not shrink it
        return dropped

    def _sweep_if_due(self, now: float) -> None:
        """The lazy sweep: purge once per cleanup_interval at most, or when the clock went back."""
        if now - self._last_sweep >= self.cleanup_interval or now < self._last_sweep:
            self.purge()

    def _bucket(self, key_id: str, now: float) -> _Bucket:
        """The bucket of ``key_id`` rolled to ``now`` and marked seen, created if there is none."""
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = _Bucket(now, 0, 0, now)
        else:
            self._touch(bucket, now)
        return bucket

    def _touch(self, bucket: _Bucket, now: float) -> None:
        """Roll ``bucket`` to ``now`` and mark it seen then."""
        self._roll(bucket, now)
        bucket.last_seen = now

    def _rolled(self, bucket: _Bucket, now: float) -> tuple[float, int, int]:
        """(start, previous, current) of the bucket seen at ``now`` (which may be in the past)."""
        elapsed = now - bucket.start
        if elapsed < 0:  # the clock went back: restart the window here, forgetting nothing
            return now, bucket.previous, bucket.current
        if elapsed < self.window:
            return bucket.start, bucket.previous, bucket.current
        if elapsed < 2 * self.window:
            return bucket.start + self.window, bucket.current, 0
        return now, 0, 0

    def _roll(self, bucket: _Bucket, now: float) -> None:
        """Store the rolled (start, previous, current) of ``bucket`` at ``now``."""
        bucket.start, bucket.previous, bucket.current = self._rolled(bucket, now)

    def _estimate(self, start: float, previous: int, current: int, now: float) -> float:
        """E(t) = p * (W - e) / W + c, with the offset e clamped to [0, W]."""
        offset = min(max(now - start, 0.0), self.window)
        return previous * ((self.window - offset) / self.window) + current

    def _estimate_later(self, bucket: _Bucket, when: float) -> float:
        """E at time ``when`` (now or later), assuming no further requests."""
        start, previous, current = self._rolled(bucket, when)
        return self._estimate(start, previous, current, when)

    def retry_after_at(
        self, start: float, previous: int, current: int, now: float, limit: int
    ) -> int:
        """``retry_after`` for a counter held elsewhere (already rolled to ``now``): the shared
        limiter's Redis script returns the counts, the arithmetic stays here."""
        return self._retry_after(_Bucket(start, previous, current, now), now, limit)

    def _retry_after(self, bucket: _Bucket, now: float, limit: int) -> int:
        """The smallest whole r >= 1 with E(now + r) < limit (bucket already rolled to now)."""
        window = self.window
        offset = min(max(now - bucket.start, 0.0), window)
        if bucket.current < limit:
            delay = window - offset - window * (limit - bucket.current) / bucket.previous
        else:
            delay = 2 * window - offset - window * limit / bucket.current
        retry = max(1, math.floor(delay) + 1)
        # E never grows without requests, so this settles in a step or two.
        while retry > 1 and self._estimate_later(bucket, now + retry - 1) < limit:
            retry -= 1
        while self._estimate_later(bucket, now + retry) >= limit:
            retry += 1
        return retry


class RateLimiter(SlidingWindowCounter):
    """Sliding-window counter per key_id; one instance for the process (survives key reloads)."""

    def __init__(
        self,
        clock: SecondsClock,
        default_limit: int,
        window: float = 60.0,
        cleanup_interval: float = 300.0,
    ) -> None:
        _check_limit(default_limit)
        super().__init__(clock, window, cleanup_interval)
        self.default_limit = default_limit
        #: The clock's time at the last ``check`` (what its request was counted at).
        self.checked_at = self._last_sweep

    def _check_settings(self, window: float, cleanup_interval: float) -> None:
        """Refuse a window that is not positive and a negative cleanup_interval."""
        super()._check_settings(window, cleanup_interval)
        if not cleanup_interval >= 0:
            raise ValueError("cleanup_interval must not be negative")

    def check(self, key_id: str, limit: int | None = None) -> RateDecision:
        """Count one request for ``key_id`` if it is within ``limit`` (default: default_limit)."""
        if limit is None:
            limit = self.default_limit
        else:
            _check_limit(limit)
        # The arithmetic of ``_bucket``, ``_estimate``, ``_remaining`` and ``_reset`` inlined (it
        # runs on every request): the same operations on the same floats, so the same answers.
        now = self._clock.seconds()
        if now - self._last_sweep >= self.cleanup_interval or now < self._last_sweep:
            self.purge()
        window = self.window
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = _Bucket(now, 0, 0, now)
        else:
            if not 0 <= now - bucket.start < window:
                self._roll(bucket, now)
            bucket.last_seen = now
        start, previous, current = bucket.start, bucket.previous, bucket.current
        offset = now - start
        if offset < 0.0:
            offset = 0.0
        elif offset > window:
            offset = window
        share = previous * ((window - offset) / window)  # E = share + current
        allowed = share + current < limit
        if allowed:
            current += 1
            bucket.current = current
        # remaining: the smallest k >= 0 with E + k >= limit (see ``_remaining``).
        remaining = _ceil(limit - (share + current))
        if remaining < 0:  # (max(0, ...) without the builtin's call: the same int)
            remaining = 0
        while remaining > 0 and share + (current + remaining - 1) >= limit:
            remaining -= 1
        while share + (current + remaining) < limit:
            remaining += 1
        if current > 0:
            reset = _ceil(2 * window - offset)
        elif previous > 0:
            reset = _ceil(window - offset)
        else:
            reset = 0
        self.checked_at = now
        # (tuple.__new__ directly: the NamedTuple's generated __new__ frame does only this)
        return _new_decision(RateDecision, (
            allowed, limit, remaining, reset,
            None if allowed else self._retry_after(bucket, now, limit),
        ))

    def refund(self, key_id: str, charged_at: float) -> None:
        """Give back one request counted at ``charged_at`` (the gateway refused it after the
        check: refused requests cost nothing). Taken from the window that counted it, if the
        key's counter still remembers that window."""
        bucket = self._buckets.get(key_id)
        if bucket is None:
            return
        self._roll(bucket, self._clock.seconds())
        if charged_at >= bucket.start:
            bucket.current = max(0, bucket.current - 1)
        elif charged_at >= bucket.start - self.window:
            bucket.previous = max(0, bucket.previous - 1)

    def remaining(self, key_id: str, limit: int | None = None) -> int:
        """Further requests ``key_id`` may make right now (for X-RateLimit-Remaining)."""
        if limit is None:
            limit = self.default_limit
        bucket = self._buckets.get(key_id)
        if bucket is None:
            return limit
        now = self._clock.seconds()
        start, previous, current = self._rolled(bucket, now)
        return self._remaining(start, previous, current, now, limit)

    def decision_at(
        self, start: float, previous: int, current: int, now: float, limit: int, allowed: bool
    ) -> RateDecision:
        """The decision ``check`` would give for a counter held elsewhere (already rolled to
        ``now`` and counted): what the shared limiter turns its Redis script's answer into."""
        return RateDecision(
            allowed=allowed,
            limit=limit,
            remaining=self._remaining(start, previous, current, now, limit),
            reset=self._reset(start, previous, current, now),
            retry_after=(
                None if allowed else self.retry_after_at(start, previous, current, now, limit)
            ),
        )

    def _remaining(self, start: float, previous: int, current: int, now: float, limit: int) -> int:
        """The smallest k >= 0 with E + k >= limit: how many more are allowed right now."""
        estimate = self._estimate(start, previous, current, now)
        k = max(0, math.ceil(limit - estimate))
        # Float rounding may put the closed form one off; settle it with E itself.
        while k > 0 and self._estimate(start, previous, current + k - 1, now) >= limit:
            k -= 1
        while self._estimate(start, previous, current + k, now) < limit:
            k += 1
        return k

    def _reset(self, start: float, previous: int, current: int, now: float) -> int:
        """Whole seconds until E reaches 0 (the key's window holds nothing any more)."""
        offset = min(max(now - start, 0.0), self.window)  # not start + 2W - now: that may round up
        if current > 0:
            return math.ceil(2 * self.window - offset)
        if previous > 0:
            return math.ceil(self.window - offset)
        return 0


def _check_limit(limit: int) -> None:
    """Refuse limits below 1 (the key file and config only produce positive ones)."""
    if limit < 1:
        raise ValueError(f"rate limit must be at least 1, not {limit}")
