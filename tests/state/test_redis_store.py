"""The connection to Redis: rediss:// verifies the server's certificate; status and latency."""

from __future__ import annotations

import os
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from llamaproxy.state.redis_store import RedisState, StateUnavailableError
from tests.redis_server import RedisServer
from tests.state.test_limits import connected
from tests.tls_certs import make_ca, make_server_cert, write_ca, write_pem_files


class RedisStoreTests(TestCase):
    def tls_redis(self) -> tuple[RedisServer, str]:
        directory = tempfile.mkdtemp(prefix="llamaproxy-redis-tls-")
        ca = make_ca()
        files = write_pem_files(directory, make_server_cert(ca))
        redis = RedisServer(tls=(files.cert_file, files.key_file)).start()
        self.addCleanup(redis.cleanup)
        return redis, write_ca(directory, ca)

    def trusting(self, ca_file: str | None) -> None:
        """Trust ``ca_file`` (the platform's roots read SSL_CERT_FILE) or only the system's."""
        previous = os.environ.get("SSL_CERT_FILE")
        if ca_file is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = ca_file

        def restore() -> None:
            if previous is None:
                os.environ.pop("SSL_CERT_FILE", None)
            else:
                os.environ["SSL_CERT_FILE"] = previous

        self.addCleanup(restore)

    def start(self, redis: RedisServer) -> RedisState:
        state = RedisState(redis.state_url, reactor, "closed")
        state.startService()
        self.addCleanup(state.stopService)
        return state

    def test_rediss_with_a_trusted_certificate(self) -> Deferred[None]:
        async def run() -> None:
            redis, ca_file = self.tls_redis()
            self.trusting(ca_file)
            state = self.start(redis)
            await connected(state)
            self.assertEqual(await state.eval("return 'tls'", [], []), "tls")
            document = state.status_json()
            self.assertEqual(document["status"], "up")
            self.assertTrue(document["url"].startswith("rediss://localhost:"))
            self.assertIsNotNone(document["latency_ms"])
        return Deferred.fromCoroutine(run())

    def test_rediss_refuses_an_unknown_certificate(self) -> Deferred[None]:
        async def run() -> None:
            redis, _ = self.tls_redis()
            self.trusting(None)  # the test CA is not among the system's roots
            state = self.start(redis)
            await deferLater(reactor, 1.0, lambda: None)
            self.assertFalse(state.connected)
            with self.assertRaises(StateUnavailableError):
                await state.eval("return 1", [], [])
            self.assertEqual(state.status_json()["status"], "down")
        return Deferred.fromCoroutine(run())

    def test_a_wrong_password_never_connects(self) -> Deferred[None]:
        async def run() -> None:
            redis = RedisServer(password="right").start()
            self.addCleanup(redis.cleanup)
            redis.password = "wrong"
            state = self.start(redis)
            await deferLater(reactor, 0.5, lambda: None)
            self.assertFalse(state.connected)
            document = state.status_json()
            self.assertEqual(document["status"], "down")
            self.assertIn("WRONGPASS", document["last_error"])
            self.assertNotIn("wrong", document["url"])  # credentials never shown
        return Deferred.fromCoroutine(run())
