"""Tests for llamaproxy.auth.ratelimit: the sliding-window counter and its header arithmetic."""

from __future__ import annotations

import copy
from bisect import bisect_left

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.auth import ratelimit
from llamaproxy.auth.ratelimit import RateDecision, RateLimiter


def make(limit: int = 5, start: float = 0.0, **kwargs: float) -> tuple[Clock, RateLimiter]:
    """A Clock at ``start`` and a limiter driven by it."""
    clock = Clock()
    clock.advance(start)
    return clock, RateLimiter(clock, limit, **kwargs)


def burst(limiter: RateLimiter, key: str, count: int, limit: int | None = None) -> list[bool]:
    """``count`` checks at the current instant; which were allowed."""
    return [limiter.check(key, limit).allowed for _ in range(count)]


def allowed_after(clock: Clock, limiter: RateLimiter, key: str, delay: float) -> bool:
    """Whether ``key`` would be allowed ``delay`` seconds from now (probed on a copy)."""
    clock2, limiter2 = copy.deepcopy((clock, limiter))
    clock2.advance(delay)
    return limiter2.check(key).allowed


class BurstTests(SynchronousTestCase):
    def test_exactly_limit_then_refused(self) -> None:
        _, limiter = make(limit=5)
        decisions = [limiter.check("a") for _ in range(5)]
        self.assertTrue(all(d.allowed for d in decisions))
        self.assertEqual([d.remaining for d in decisions], [4, 3, 2, 1, 0])
        self.assertEqual({d.retry_after for d in decisions}, {None})
        refused = limiter.check("a")
        self.assertFalse(refused.allowed)
        self.assertEqual(refused.remaining, 0)
        # c == limit: E stays at the limit until the window ends at t=60 (E(60) = 5, not < 5).
        self.assertEqual(refused.retry_after, 61)
        self.assertEqual(refused.reset, 120)

    def test_allowed_at_retry_after_not_before(self) -> None:
        clock, limiter = make(limit=5)
        burst(limiter, "a", 5)
        clock.advance(10.5)
        retry = limiter.check("a").retry_after
        self.assertEqual(retry, 50)  # window ends at 60; the first whole second after is 10.5 + 50
        clock.advance(49)
        self.assertFalse(limiter.check("a").allowed)  # t = 59.5
        clock.advance(1)
        self.assertTrue(limiter.check("a").allowed)  # t = 60.5: E = 5 * 59.5/60 + 0 < 5

    def test_retry_after_while_previous_window_decays(self) -> None:
        # 60 in window [0, 60), then the key's limit is 30. At t=90 (e = 30) E = 60 * 30/60 = 30:
        # refused, and d > W - e - W * (limit - c) / p = 60 - 30 - 60 * 30/60 = 0: retry_after 1.
        clock, limiter = make(limit=60)
        burst(limiter, "a", 60)
        clock.advance(90)
        refused = limiter.check("a", limit=30)
        self.assertEqual((refused.allowed, refused.retry_after), (False, 1))
        # The same at t=84 (E = 36): d > 60 - 24 - 30 = 6, so refused at 90, allowed at 91.
        clock2, limiter2 = make(limit=60)
        burst(limiter2, "a", 60)
        clock2.advance(84)
        self.assertEqual(limiter2.check("a", 30).retry_after, 7)
        clock2.advance(6)
        self.assertFalse(limiter2.check("a", 30).allowed)  # t = 90: E = 30, not below
        clock2.advance(1)
        self.assertTrue(limiter2.check("a", 30).allowed)  # t = 91: E = 29

    def test_refused_requests_cost_nothing(self) -> None:
        clock, limiter = make(limit=3)
        burst(limiter, "a", 3)
        first = limiter.check("a")
        clock.advance(30)
        hammered = [limiter.check("a") for _ in range(1000)]
        self.assertFalse(any(d.allowed for d in hammered))
        self.assertEqual(hammered[-1].retry_after, (first.retry_after or 0) - 30)
        clock.advance(31)
        self.assertTrue(limiter.check("a").allowed)

    def test_headers(self) -> None:
        clock, limiter = make(limit=2)
        ok = limiter.check("a")
        self.assertEqual(ok.headers(), (
            ("X-RateLimit-Limit", "2"),
            ("X-RateLimit-Remaining", "1"),
            ("X-RateLimit-Reset", "120"),
        ))
        limiter.check("a")
        clock.advance(20)
        refused = limiter.check("a")
        self.assertEqual(refused, RateDecision(False, 2, 0, 100, 41))
        self.assertEqual(refused.headers(), (
            ("X-RateLimit-Limit", "2"),
            ("X-RateLimit-Remaining", "0"),
            ("X-RateLimit-Reset", "100"),
            ("Retry-After", "41"),
        ))

    def test_reset(self) -> None:
        clock, limiter = make(limit=5)
        self.assertEqual(limiter.check("a").reset, 120)  # c > 0: clear at s + 2W
        clock.advance(70)
        # Rolled over to [60, 120) with p = 1; this request makes c = 1: clear at 60 + 2W.
        self.assertEqual(limiter.check("a").reset, 110)
        clock.advance(119.5)  # t = 189.5: both windows behind; the bucket restarts here
        self.assertEqual(limiter.check("a").reset, 120)


class KeysAndLimitsTests(SynchronousTestCase):
    def test_keys_are_isolated(self) -> None:
        _, limiter = make(limit=2)
        self.assertEqual(burst(limiter, "a", 3), [True, True, False])
        self.assertEqual(burst(limiter, "b", 3), [True, True, False])
        self.assertEqual(len(limiter), 2)

    def test_per_key_limit_and_default(self) -> None:
        _, limiter = make(limit=2)
        self.assertEqual(burst(limiter, "big", 11, limit=10).count(True), 10)
        self.assertEqual(limiter.check("big", 10).limit, 10)
        self.assertEqual(burst(limiter, "default", 3).count(True), 2)
        self.assertEqual(limiter.check("default").limit, 2)

    def test_limit_change_applies_to_existing_counts(self) -> None:
        clock, limiter = make(limit=10)
        burst(limiter, "a", 10)
        self.assertFalse(limiter.check("a").allowed)
        # A reload raised the key's limit: the 10 already counted still count.
        self.assertEqual(burst(limiter, "a", 11, limit=20).count(True), 10)
        # Lowered to 5 with c = 20 > limit: d > 2W - e - W * limit / c = 120 - 60 * 5/20 = 105.
        refused = limiter.check("a", 5)
        self.assertEqual((refused.allowed, refused.retry_after), (False, 106))
        clock.advance(105)
        self.assertFalse(limiter.check("a", 5).allowed)  # E = 20 * 15/60 = 5
        clock.advance(1)
        self.assertTrue(limiter.check("a", 5).allowed)  # E = 20 * 14/60 < 5

    def test_bad_limits(self) -> None:
        clock = Clock()
        self.assertRaises(ValueError, RateLimiter, clock, 0)
        self.assertRaises(ValueError, RateLimiter, clock, 5, window=0)
        self.assertRaises(ValueError, RateLimiter(clock, 5).check, "a", 0)


class SlidingTests(SynchronousTestCase):
    def test_across_a_window_boundary(self) -> None:
        # The key's window starts with its first request at t=0; 99 more at t=59.
        clock, limiter = make(limit=100)
        limiter.check("a")
        clock.advance(59)
        self.assertEqual(burst(limiter, "a", 100).count(True), 99)
        # t=61: window [60, 120), e = 1: E = 100 * 59/60 = 98.3 still "in" the window.
        clock.advance(2)
        first = limiter.check("a")
        self.assertEqual((first.allowed, first.remaining), (True, 1))  # 99.3 after it
        self.assertEqual(burst(limiter, "a", 2), [True, False])
        # t=62 (e = 2): 96.7 of the burst still count, E = 96.7 + 2: two more.
        clock.advance(1)
        self.assertEqual(burst(limiter, "a", 3), [True, True, False])
        # t=90: the previous window weighs half: E = 50 + 4, so 46 more, 45 after this one.
        clock.advance(28)
        self.assertEqual(limiter.check("a").remaining, 45)

    def test_fresh_window_is_exact(self) -> None:
        # A key's first window begins at its first request, at whatever time that is.
        clock, limiter = make(limit=3, start=1_700_000_059.25)
        self.assertEqual(burst(limiter, "a", 4), [True, True, True, False])
        clock.advance(59.5)
        self.assertFalse(limiter.check("a").allowed)
        clock.advance(1)
        self.assertTrue(limiter.check("a").allowed)

    def test_idle_key_gets_a_fresh_window(self) -> None:
        clock, limiter = make(limit=3)
        burst(limiter, "a", 3)
        clock.advance(500)
        self.assertEqual(burst(limiter, "a", 4), [True, True, True, False])

    def test_clock_jumping_back(self) -> None:
        clock, limiter = make(limit=3, start=1000)
        burst(limiter, "a", 3)
        clock.advance(30)
        limiter.check("b")
        clock.rightNow = 400.0  # the clock went back 630 s
        refused = limiter.check("a")  # counts kept: still refused
        self.assertFalse(refused.allowed)
        self.assertGreaterEqual(refused.reset, 0)
        self.assertEqual(refused.retry_after, 61)  # window restarted at 400, c == limit
        self.assertTrue(limiter.check("c").allowed)
        clock.advance(60.5)
        self.assertTrue(limiter.check("a").allowed)
        clock.rightNow = 0.0
        for key in ("a", "b", "c"):
            decision = limiter.check(key)
            self.assertGreaterEqual(decision.remaining, 0)
            self.assertGreaterEqual(decision.reset, 0)


class PurgeTests(SynchronousTestCase):
    def test_idle_buckets_purged_active_kept(self) -> None:
        clock, limiter = make(limit=5, cleanup_interval=300)
        limiter.check("idle")
        clock.advance(200)
        limiter.check("active")
        clock.advance(99)  # t=299: "idle" is clear, but no sweep yet
        limiter.check("active")
        self.assertEqual(len(limiter), 2)
        clock.advance(1)  # t=300: the sweep runs
        limiter.check("active")
        self.assertEqual(len(limiter), 1)
        clock.advance(121)  # t=421: "active" idle 121 s > 2W, but the next sweep is at 600
        limiter.check("other")
        self.assertEqual(len(limiter), 2)
        clock.advance(79)
        limiter.check("other")
        clock.advance(100)  # t=600: sweep; "active" idle 300 s goes, "other" idle 100 s stays
        limiter.check("other")
        self.assertEqual(len(limiter), 1)
        self.assertEqual(list(limiter._buckets), ["other"])

    def test_purge_keeps_recent_buckets(self) -> None:
        clock, limiter = make(limit=5)
        burst(limiter, "a", 5)
        clock.advance(120)  # idle exactly 2W: kept
        self.assertEqual(limiter.purge(), 0)
        clock.advance(0.5)
        self.assertEqual(limiter.purge(), 1)
        self.assertEqual(len(limiter), 0)

    def test_state_is_constant_size(self) -> None:
        """Memory per key is four scalars, whatever the limit and the traffic.

        Micro-check of the cost (timeit on the dev container, CPython 3.11; informative only,
        never asserted): ``check`` ~2.6 µs allowed and ~3.5 µs refused, the same for limit 10
        and 1 000 000 and with 1 or 100 000 buckets held (the older timestamp-list limiter's
        cost grew with the limit); sweeping 100 000 idle buckets ~8 ms, once per interval.
        """
        clock, limiter = make(limit=1_000_000)
        for _ in range(10_000):
            limiter.check("a")
            clock.advance(0.001)
        bucket = limiter._buckets["a"]
        self.assertEqual(bucket.__slots__, ("start", "previous", "current", "last_seen"))
        self.assertFalse(hasattr(bucket, "__dict__"))
        self.assertEqual(bucket.current, 10_000)


gaps = st.one_of(
    st.just(0.0),
    st.floats(min_value=0, max_value=3, allow_nan=False),
    st.floats(min_value=0, max_value=130, allow_nan=False),
)


class PropertyTests(SynchronousTestCase):
    @given(limit=st.integers(1, 12), start=st.floats(0, 2e9), steps=st.lists(gaps, max_size=250))
    def test_bounds_and_invariants(self, limit: int, start: float, steps: list[float]) -> None:
        clock, limiter = make(limit=limit, start=start)
        allowed_at: list[float] = []
        for gap in steps:
            clock.advance(gap)
            decision = limiter.check("k")
            self.assertGreaterEqual(decision.remaining, 0)
            self.assertGreaterEqual(decision.reset, 0)
            self.assertLessEqual(decision.reset, 120)
            if decision.allowed:
                self.assertIsNone(decision.retry_after)
                allowed_at.append(clock.seconds())
            else:
                self.assertEqual(decision.remaining, 0)
                assert decision.retry_after is not None
                self.assertGreaterEqual(decision.retry_after, 1)
        # At most 2 * limit allowed in any span [t, t + 60) (the fullest ones start at a request).
        for t in allowed_at:
            in_span = bisect_left(allowed_at, t + 60) - bisect_left(allowed_at, t)
            self.assertLessEqual(in_span, 2 * limit)

    @given(limit=st.integers(1, 8), steps=st.lists(gaps, min_size=1, max_size=60))
    def test_remaining_and_retry_after_are_exact(self, limit: int, steps: list[float]) -> None:
        clock, limiter = make(limit=limit, start=1_700_000_000.0)
        for gap in steps:
            clock.advance(gap)
            decision = limiter.check("k")
            if decision.allowed:
                # Exactly `remaining` more are allowed at this instant.
                _, probe = copy.deepcopy((clock, limiter))
                more = burst(probe, "k", decision.remaining + 1)
                self.assertEqual(more, [True] * decision.remaining + [False])
            else:
                retry = decision.retry_after
                assert retry is not None
                self.assertTrue(allowed_after(clock, limiter, "k", retry))
                if retry > 1:
                    self.assertFalse(allowed_after(clock, limiter, "k", retry - 1))


class RefundTests(SynchronousTestCase):
    """Refused requests cost nothing (issue 15.4): a charge can be given back."""

    def test_refund_in_the_same_window(self) -> None:
        clock = Clock()
        limiter = RateLimiter(clock, 3)
        for _ in range(3):
            self.assertTrue(limiter.check("a").allowed)
        self.assertFalse(limiter.check("a").allowed)
        limiter.refund("a", 0.0)
        self.assertEqual(limiter.remaining("a"), 1)
        self.assertTrue(limiter.check("a").allowed)
        self.assertEqual(limiter.remaining("a"), 0)

    def test_refund_after_the_window_rolled(self) -> None:
        clock = Clock()
        limiter = RateLimiter(clock, 2)
        limiter.check("a")
        limiter.check("a")
        charged = clock.seconds()
        clock.advance(61)  # those two are now the previous window's
        estimate_before = limiter.remaining("a")
        limiter.refund("a", charged)
        self.assertGreater(limiter.remaining("a"), estimate_before)
        clock.advance(120)
        limiter.refund("a", charged)  # forgotten already: nothing to give back, nothing breaks
        self.assertEqual(limiter.remaining("a"), 2)

    def test_refund_never_goes_negative_or_touches_others(self) -> None:
        clock = Clock()
        limiter = RateLimiter(clock, 2)
        limiter.refund("nobody", 0.0)
        limiter.check("a")
        limiter.refund("a", 0.0)
        limiter.refund("a", 0.0)
        self.assertEqual(limiter.remaining("a"), 2)
        self.assertEqual(len(limiter), 1)


class InlinedCheckTests(SynchronousTestCase):
    """``check`` does its window arithmetic inline (it runs on every request); the shared
    limiter's ``decision_at`` goes through the helpers. Both must give the same decision for
    the same counter, whatever the clock does."""

    @given(st.integers(1, 6), st.lists(st.tuples(
        st.floats(-5.0, 130.0, allow_nan=False), st.sampled_from(["a", "b"]),
        st.booleans()), min_size=1, max_size=40))
    def test_check_decides_as_decision_at(
        self, limit: int, steps: list[tuple[float, str, bool]]
    ) -> None:
        clock, limiter = make(limit=limit, start=1000.0)
        for delay, key, refund in steps:
            if delay >= 0:
                clock.advance(delay)
            else:
                clock.rightNow += delay  # a clock that goes back
            before = limiter._buckets.get(key)
            state = None if before is None else copy.copy(before)
            decision = limiter.check(key)
            now = clock.seconds()
            if state is None:
                start, previous, current = now, 0, 0
            else:
                start, previous, current = limiter._rolled(state, now)
            if decision.allowed:
                current += 1
            self.assertEqual(
                decision,
                limiter.decision_at(start, previous, current, now, limit, decision.allowed))
            if refund and decision.allowed:
                limiter.refund(key, now)


class DecisionMadeDirectlyTests(SynchronousTestCase):
    """``check`` makes its ``RateDecision`` with ``tuple.__new__``: the same object as the
    NamedTuple's own constructor, allowed or refused."""

    def test_the_same_decision_as_the_constructor(self) -> None:
        clock = Clock()
        limiter = RateLimiter(clock, 2)
        for _ in range(3):
            decision = limiter.check("k")
            self.assertIs(type(decision), RateDecision)
            self.assertEqual(decision, RateDecision(*decision))
            self.assertEqual(decision.headers(), RateDecision(*decision).headers())
        self.assertFalse(decision.allowed)
        self.assertIsNotNone(decision.retry_after)


class FieldsTests(SynchronousTestCase):
    """``RateDecision.fields`` is ``headers()`` encoded, the limit's text remembered."""

    @given(
        st.booleans(), st.integers(1, 10**12), st.integers(0, 10**12), st.integers(0, 10**6),
        st.none() | st.integers(1, 10**6),
    )
    def test_the_headers_in_bytes(
        self, allowed: bool, limit: int, remaining: int, reset: int, retry_after: int | None
    ) -> None:
        decision = RateDecision(allowed, limit, remaining, reset, retry_after)
        expected = tuple(
            (name.encode("latin-1"), value.encode("latin-1")) for name, value in decision.headers()
        )
        self.assertEqual(decision.fields(), expected)
        self.assertEqual(decision.fields(), expected)  # the limit's text remembered

    def test_more_limits_than_remembered(self) -> None:
        for limit in range(1, 600):
            decision = RateDecision(True, limit, 0, 0, None)
            self.assertEqual(decision.fields()[0], (b"X-RateLimit-Limit", str(limit).encode()))
        self.assertLessEqual(len(ratelimit._LIMIT_TEXT), 256)


class CheckedAtTests(SynchronousTestCase):
    """``checked_at`` is the clock's time the last ``check`` counted at."""

    def test_the_time_of_the_last_check(self) -> None:
        clock, limiter = make(limit=2, start=1000.0)
        for _ in range(4):
            clock.advance(0.25)
            limiter.check("a")
            self.assertEqual(limiter.checked_at, clock.seconds())
