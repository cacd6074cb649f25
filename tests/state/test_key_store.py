"""API keys kept in Redis: `llamaproxy keys --store` edits them, replicas load them."""

from __future__ import annotations

import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from llamaproxy.state.key_store import KeyPoller, RedisKeyStore, fetch_keys, put_keys
from llamaproxy.state.redis_store import RedisState
from tests.redis_server import RedisServer
from tests.state.test_limits import connected
from tests.state.test_slot_leases import until


class RedisKeyStoreTests(TestCase):
    def setUp(self) -> Deferred[None]:
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        self.state = RedisState(self.redis.state_url, reactor, "open")
        self.state.startService()
        self.addCleanup(self.state.stopService)
        return Deferred.fromCoroutine(connected(self.state))

    def keys(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "llamaproxy", "keys", "--store", self.redis.url, *args],
            capture_output=True, text=True, timeout=60,
        )
        if done.returncode != 0:
            raise AssertionError(done.stderr)
        return done.stdout.strip()

    def test_the_command_line_edits_and_replicas_follow(self) -> Deferred[None]:
        async def run() -> None:
            store = RedisKeyStore(self.state)
            poller = KeyPoller(store, reactor, interval=0.05)
            poller.startService()
            self.addCleanup(poller.stopService)
            await until(lambda: store.version == "0", "the (empty) keys loaded")
            self.assertEqual(len(store.keys), 0)
            secret = self.keys("generate", "--name", "alice", "--rate-limit", "7", "-q")
            await until(lambda: len(store.keys) == 1, "alice's key loaded")
            listing = self.keys("list")
            self.assertIn("alice", listing)
            self.assertNotIn("llamaproxy-keys-", listing)  # the temporary file is never named
            self.assertNotIn(secret, self.keys("list"))
            rotated = self.keys("rotate", "--name", "alice", "-q")
            self.assertNotEqual(rotated, secret)
            version = store.version
            await until(lambda: store.version != version, "the rotation loaded")
            self.keys("remove", "--name", "alice")
            await until(lambda: len(store.keys) == 0, "alice's key gone")
        return Deferred.fromCoroutine(run())

    def test_a_concurrent_change_is_never_overwritten(self) -> Deferred[None]:
        async def run() -> None:
            version, text = await fetch_keys(self.state)
            self.assertEqual((version, text), ("0", ""))
            self.assertTrue(await put_keys(self.state, "0", "a:sk-aaaaaaaaaaaaaaaa\n"))
            self.assertFalse(await put_keys(self.state, "0", "b:sk-bbbbbbbbbbbbbbbb\n"))
            self.assertEqual(await fetch_keys(self.state, "1"), ("1", None))
            self.assertEqual(await fetch_keys(self.state), ("1", "a:sk-aaaaaaaaaaaaaaaa\n"))
        return Deferred.fromCoroutine(run())
