"""Shared request and token limits against a real redis-server."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from llamaproxy.auth.access import Access, TokenLimits
from llamaproxy.auth.ratelimit import RateLimiter
from llamaproxy.auth.tokenlimit import TokenRateLimiter
from llamaproxy.state.limits import SharedLimits
from llamaproxy.state.redis_store import RedisState
from tests.redis_server import RedisServer


async def connected(state: RedisState) -> None:
    """Wait until ``state`` has its connection (a real one: up to a few seconds)."""
    for _ in range(500):
        if state.connected:
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("never connected to redis-server")


class SharedLimitsTests(TestCase):
    def setUp(self) -> Deferred[None]:
        self.redis = RedisServer(password="s3cret").start()
        self.addCleanup(self.redis.cleanup)
        return Deferred.fromCoroutine(self._replicas())

    async def _replicas(self) -> None:
        # Three replicas: three connections, three in-process limiters, one Redis.
        self.replicas = []
        for _ in range(3):
            state = RedisState(self.redis.state_url, reactor, "open")
            state.startService()
            self.addCleanup(state.stopService)
            await connected(state)
            tokens = TokenLimits(TokenRateLimiter(reactor), default=100)
            self.replicas.append(SharedLimits(state, RateLimiter(reactor, 5), tokens))

    def local(self) -> Access:
        raise AssertionError("Redis is up: the local fallback must not be used")

    async def _burst(self, n: int) -> list[Access]:
        checks = [
            self.replicas[i % 3].check("burst", None, self.local) for i in range(n)
        ]
        results = []
        for d in checks:
            results.append(await d)
        return results

    def test_a_burst_over_three_replicas_admits_the_limit_once(self) -> Deferred[None]:
        async def run() -> None:
            results = await self._burst(12)
            allowed = [a for a in results if a.error is None]
            self.assertEqual(len(allowed), 5)
            # Checks asked in one reactor turn share one round trip per replica.
            self.assertEqual([replica.batches for replica in self.replicas], [1, 1, 1])
            refused = [a for a in results if a.error is not None]
            first = refused[0].error
            assert first is not None
            self.assertEqual(first.status, 429)
            headers = dict(first.headers)
            self.assertEqual(headers["X-RateLimit-Limit"], "5")
            self.assertEqual(headers["X-RateLimit-Remaining"], "0")
            # A burst of the limit at once: the oldest leave after the whole window.
            self.assertIn(headers["Retry-After"], ("60", "61"))
            # Each replica's answer counts every replica's requests (in Redis's order).
            self.assertEqual(
                sorted(dict(a.headers)[b"X-RateLimit-Remaining"] for a in allowed),
                [b"0", b"1", b"2", b"3", b"4"],
            )
        return Deferred.fromCoroutine(run())

    def test_a_refund_gives_the_request_back_to_every_replica(self) -> Deferred[None]:
        async def run() -> None:
            results = await self._burst(5)
            self.assertTrue(all(a.error is None and a.shared for a in results))
            last = next(a for a in results if dict(a.headers)[b"X-RateLimit-Remaining"] == b"0")
            self.assertEqual(self.replicas[0].refund(last), 1)
            await deferLater(reactor, 0.1, lambda: None)
            again = await self.replicas[2].check("burst", None, self.local)
            self.assertIsNone(again.error)
            self.assertEqual(dict(again.headers)[b"X-RateLimit-Remaining"], b"0")
            refused = await self.replicas[1].check("burst", None, self.local)
            self.assertIsNotNone(refused.error)
        return Deferred.fromCoroutine(run())

    def test_tokens_spent_on_one_replica_limit_the_others(self) -> Deferred[None]:
        async def run() -> None:
            first = await self.replicas[0].check("tok", None, self.local)
            self.assertIsNone(first.error)
            self.replicas[0].spend("tok", 150)
            await deferLater(reactor, 0.1, lambda: None)
            refused = await self.replicas[1].check("tok", None, self.local)
            assert refused.error is not None
            self.assertEqual(refused.error.status, 429)
            self.assertGreaterEqual(int(dict(refused.error.headers)["Retry-After"]), 1)
        return Deferred.fromCoroutine(run())

    def test_redis_gone_open_uses_the_local_limits_closed_refuses(self) -> Deferred[None]:
        async def run() -> None:
            self.redis.stop()
            replica = self.replicas[0]
            for _ in range(500):
                if not replica.state.connected:
                    break
                await deferLater(reactor, 0.01, lambda: None)
            local = Access("k", ((b"X-RateLimit-Limit", b"5"),))
            got = await replica.check("k", None, lambda: local)
            self.assertIs(got, local)
            self.assertEqual(replica.state.health, "down")
            replica.state.failure_mode = "closed"
            closed = await replica.check("k", None, lambda: local)
            assert closed.error is not None
            self.assertEqual((closed.error.status, dict(closed.error.headers)["Retry-After"]),
                             (503, "1"))
            # Redis comes back (empty): the replica reconnects and shares again.
            self.redis.start()
            for _ in range(1000):
                if replica.state.connected:
                    break
                await deferLater(reactor, 0.01, lambda: None)
            back = await replica.check("k", None, self.local)
            self.assertIsNone(back.error)
            self.assertTrue(back.shared)
            self.assertEqual(replica.state.health, "up")
        return Deferred.fromCoroutine(run())
