"""Tests for llamaproxy.auth.access: what ``AccessControl`` lets through carries the limiter's
decision as response header fields in bytes, charged at the time the limiter counted it."""

from __future__ import annotations

from datetime import UTC, datetime

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.auth.access import Access, AccessControl
from llamaproxy.auth.keys import parse_keys
from llamaproxy.auth.ratelimit import RateLimiter
from llamaproxy.auth.store import KeyStore

KEY = "sk-unit-test-key-000000000001"
OTHER = "sk-unit-test-key-000000000002"
AUTH = f"Bearer {KEY}".encode()


def control(limit: int | None) -> tuple[Clock, AccessControl]:
    """A Clock, and an AccessControl with one key ("alice") limited to ``limit`` per minute."""
    clock = Clock()
    clock.advance(1_780_000_000.0)
    store = KeyStore("/nonexistent", parse_keys([f"alice:{KEY}"])[0])
    limiter = RateLimiter(clock, limit) if limit is not None else None
    return clock, AccessControl(store, limiter)


class LimitTests(SynchronousTestCase):
    """Each allowed check's headers and charge against a twin limiter's own decision."""

    def test_allowed_then_refused(self) -> None:
        clock, access = control(3)
        twin = RateLimiter(clock, 3)
        for i in range(5):
            clock.advance(0.125)
            got = access.check(AUTH, None)
            assert isinstance(got, Access)
            decision = twin.check("alice")
            if decision.allowed:
                self.assertIsNone(got.error)
                self.assertEqual(got.headers, tuple(
                    (name.encode("latin-1"), value.encode("latin-1"))
                    for name, value in decision.headers()
                ))
                self.assertEqual(got.charged_at, clock.seconds())
                self.assertEqual((got.key_id, got.rate_limit, got.shared), ("alice", None, False))
            else:
                self.assertGreaterEqual(i, 3)
                assert got.error is not None
                self.assertEqual(got.error.status, 429)
                self.assertEqual(got.error.headers, decision.headers())
                self.assertEqual(got.headers, ())

    def test_without_a_limiter(self) -> None:
        _, access = control(None)
        self.assertEqual(access.check(AUTH, None), Access("alice", (), None, None, None))

    def test_a_refund_gives_the_charge_back(self) -> None:
        clock, access = control(2)
        first = access.check(AUTH, None)
        assert isinstance(first, Access)
        self.assertEqual(dict(first.headers)[b"X-RateLimit-Remaining"], b"1")
        clock.advance(1)
        self.assertEqual(access.refund(first), 2)


class RememberedKeyTests(SynchronousTestCase):
    """``check`` reads a remembered match itself only for a key without an expiration: an
    expiring key still goes through ``authenticate_headers`` (and is refused once expired)."""

    def test_remembered_expiring_and_unknown_keys(self) -> None:
        now = [datetime(2026, 1, 1, tzinfo=UTC)]
        keys = parse_keys([f"alice:{KEY}", f"bob:{OTHER}::2026-06-01"])[0]
        access = AccessControl(KeyStore("/nonexistent", keys), None, now=lambda: now[0])
        bob = f"Bearer {OTHER}".encode()
        for _ in range(3):  # the first time learnt, then remembered
            self.assertEqual(access.check(AUTH, None), Access("alice", (), None, None, None))
            self.assertEqual(access.check(None, KEY.encode()),
                             Access("alice", (), None, None, None))
            self.assertEqual(access.check(bob, None), Access("bob", (), None, None, None))
        self.assertIn((bob, None), keys.matched)
        now[0] = datetime(2026, 7, 1, tzinfo=UTC)
        expired = access.check(bob, None)
        assert isinstance(expired, Access) and expired.error is not None
        self.assertEqual((expired.key_id, expired.error.status), (None, 401))
        unknown = access.check(b"Bearer sk-unit-test-key-999999999999", None)
        assert isinstance(unknown, Access) and unknown.error is not None
        self.assertEqual(unknown.error.status, 401)

    def test_the_fields_apply_access_unpacks(self) -> None:
        """``GatewayResource._apply_access`` unpacks an Access in this order."""
        self.assertEqual(Access._fields,
                         ("key_id", "headers", "error", "charged_at", "rate_limit", "shared"))
