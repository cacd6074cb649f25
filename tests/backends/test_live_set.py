"""Tests for llamaproxy.backends.live_set: the live backends, updated on a reload."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.backends.live_set import BackendSet
from llamaproxy.off_thread import OffThread


class BackendSetTests(SynchronousTestCase):
    """Reloading a backends file: added start, removed drain then stop, changed restart."""

    def table(self, text: str):  # type: ignore[no-untyped-def]
        from llamaproxy.backends.config_file import parse_backends_text

        return parse_backends_text(text, "backends.toml", {})

    def test_reload_applies_the_difference(self) -> None:
        from llamaproxy.config import load_config

        reactor = MemoryReactorClock()
        config = load_config({}, {"BACKEND_URL": "http://127.0.0.1:1", "DRAIN_TIMEOUT": "5"})
        backends = BackendSet(config, reactor, agent=None, backends_file="backends.toml")
        backends.startService()
        one = self.table('[[backends]]\nname = "r1"\nbase_url = "http://127.0.0.1:9001/v1"\n'
                         'models = ["a"]\n[[backends]]\nname = "r2"\n'
                         'base_url = "http://127.0.0.1:9002/v1"\nmodels = ["b"]\n')
        router = backends.apply(one)
        self.assertEqual(sorted(router.members), ["r1", "r2"])
        old_r1, old_r2 = backends.by_name["r1"], backends.by_name["r2"]
        busy = backends.loads["r2"]
        slot = busy.acquire("k").result  # a request in flight on r2
        two = self.table('[[backends]]\nname = "r1"\nbase_url = "http://127.0.0.1:9011/v1"\n'
                         'models = ["a"]\n[[backends]]\nname = "r3"\n'
                         'base_url = "http://127.0.0.1:9003/v1"\nmodels = ["c"]\n')
        router = backends.apply(two)
        self.assertEqual(sorted(router.members), ["r1", "r3"])
        self.assertTrue(backends.by_name["r1"] is not old_r1)  # changed: restarted
        self.assertFalse(old_r1.running)
        self.assertTrue(old_r2.running)  # removed, but its request is still in flight
        reactor.advance(1)
        self.assertTrue(old_r2.running)
        slot.release()
        reactor.advance(0.2)
        self.assertFalse(old_r2.running)
        backends.stopService()


class ReloadTests(SynchronousTestCase):
    """SIGHUP's reload: the file read and checked off the reactor thread, then applied."""

    def test_reload_reads_the_file_and_keeps_the_old_set_when_it_is_broken(self) -> None:
        from llamaproxy.config import load_config

        path = Path(self.mktemp())
        path.write_text('[[backends]]\nname = "r1"\nbase_url = "http://127.0.0.1:9001/v1"\n'
                        'models = ["a"]\n')
        config = load_config({}, {"BACKEND_URL": "http://127.0.0.1:1"})
        backends = BackendSet(config, MemoryReactorClock(), agent=None, backends_file=str(path))
        router = self.successResultOf(backends.reload(OffThread.inline()))
        assert router is not None
        self.assertEqual(sorted(router.members), ["r1"])
        path.write_text("not toml [")
        self.assertIsNone(self.successResultOf(backends.reload(OffThread.inline())))
        assert backends.router is not None
        self.assertEqual(sorted(backends.router.members), ["r1"])  # kept
        self.assertEqual(len(self.flushLoggedErrors()), 0)
