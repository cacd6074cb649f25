"""Usage counters shared by replicas, against a real redis-server (and the CLI reading them)."""

from __future__ import annotations

import json
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from llamaproxy.observability.usage import UsageRow
from llamaproxy.state.redis_store import RedisState
from llamaproxy.state.usage_counters import SharedUsage, read_usage
from tests.redis_server import RedisServer
from tests.state.test_limits import connected


class SharedUsageTests(TestCase):
    def setUp(self) -> Deferred[None]:
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        return Deferred.fromCoroutine(self._replicas())

    async def _replicas(self) -> None:
        self.states = []
        self.usage = []
        for _ in range(2):
            state = RedisState(self.redis.state_url, reactor, "open")
            state.startService()
            self.addCleanup(state.stopService)
            await connected(state)
            self.states.append(state)
            usage = SharedUsage(state, flush_interval=0.05)
            usage.startService()
            self.addCleanup(usage.stopService)
            self.usage.append(usage)

    def test_two_replicas_add_up_to_one_truth(self) -> Deferred[None]:
        async def run() -> None:
            self.usage[0].record("alice", "tiny", 10, 5)
            self.usage[1].record("alice", "tiny", 1, 2, partial=True)
            self.usage[1].record("bob", "tiny", 7, None)
            await self.usage[0].flush()
            await self.usage[1].flush()
            rows = await read_usage(self.states[0])
            day = rows[0].day
            self.assertEqual(rows, [
                UsageRow(day, "alice", "tiny", 2, 11, 7, 1),
                UsageRow(day, "bob", "tiny", 1, 7, 0, 0),
            ])
            self.assertEqual([r.key_id for r in await read_usage(self.states[1], "bob")], ["bob"])
            # The command-line tool reads the same counters.
            out = subprocess.run(
                [sys.executable, "-m", "llamaproxy", "usage", "--state-url", self.redis.url,
                 "--json"],
                capture_output=True, timeout=60, check=True,
            )
            document = json.loads(out.stdout)
            self.assertEqual(document["total"]["requests"], 3)
            self.assertEqual(document["total"]["total_tokens"], 25)
        return Deferred.fromCoroutine(run())

    def test_usage_counted_while_redis_is_away_arrives_once_it_is_back(self) -> Deferred[None]:
        async def run() -> None:
            self.redis.stop()
            for _ in range(500):
                if not self.states[0].connected:
                    break
                await deferLater(reactor, 0.01, lambda: None)
            self.usage[0].record("alice", "tiny", 3, 4)
            await self.usage[0].flush()
            self.assertEqual(self.usage[0].pending, 1)  # kept, not dropped
            self.redis.start()
            await connected(self.states[0])
            self.usage[0].record("alice", "tiny", 1, 1)
            await self.usage[0].flush()
            self.assertEqual(self.usage[0].pending, 0)
            rows = await read_usage(self.states[0])
            self.assertEqual([(r.requests, r.prompt_tokens, r.completion_tokens) for r in rows],
                             [(2, 4, 5)])
        return Deferred.fromCoroutine(run())
