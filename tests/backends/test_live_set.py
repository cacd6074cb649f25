"""Tests for llamaproxy.backends.live_set: the live backends, updated on a reload."""

from __future__ import annotations

import os
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


ON_DEMAND = """
[[groups]]
name = "gpu0"
max_running = 1
preload = ["a"]

[[backends]]
name = "a"
model_path = "/m/a.gguf"
models = ["a"]
start = "on_demand"
group = "gpu0"

[[backends]]
name = "b"
model_path = "/m/b.gguf"
models = ["b"]
start = "on_demand"
group = "gpu0"
idle_ttl = 60
"""


class OnDemandSetTests(SynchronousTestCase):
    """On-demand backends: not started at boot (except preloaded ones), updated in place."""

    def test_preload_and_reload(self) -> None:
        from llamaproxy.backends.config_file import parse_backends_text
        from llamaproxy.backends.on_demand import ModelState
        from llamaproxy.config import load_config
        from llamaproxy.testing import FakeProcessReactor

        reactor = FakeProcessReactor()
        key_dir = self.mktemp()
        os.makedirs(key_dir, mode=0o700)
        config = load_config({}, {"BACKEND_KEY_DIR": key_dir, "BACKEND_URL": "http://127.0.0.1:1"})

        def table(text: str):  # type: ignore[no-untyped-def]
            return parse_backends_text(text, "backends.toml", {}, is_file=lambda p: True)

        backends = BackendSet(config, reactor, agent=None, llama_server="/bin/llama-server",
                              backends_file="backends.toml")
        backends.apply(table(ON_DEMAND))
        backends.startService()
        self.assertEqual(len(reactor.spawned), 1)  # the preloaded "a" only
        self.assertEqual(backends.models["a"].state, ModelState.LOADING)
        self.assertEqual(backends.models["b"].state, ModelState.STOPPED)
        self.assertEqual(backends.models["b"].child.timings.startup_probe_interval,  # type: ignore[attr-defined]
                         0.1)  # a request waits for its start: probed often
        self.assertEqual(backends.groups["gpu0"].status_json()["running"], ["a"])
        model_b = backends.models["b"]
        # A reload: b's idle_ttl changes (in place), c is added (not started), a untouched.
        router = backends.apply(table(ON_DEMAND.replace("idle_ttl = 60", "idle_ttl = 5")
                                      + '[[backends]]\nname = "c"\nmodel_path = "/m/c.gguf"\n'
                                      'models = ["c"]\nstart = "on_demand"\n'))
        self.assertEqual(sorted(router.members), ["a", "b", "c"])
        self.assertIs(backends.models["b"], model_b)
        self.assertEqual(model_b.idle_ttl, 5.0)
        self.assertEqual(backends.models["c"].state, ModelState.STOPPED)
        self.assertEqual(len(reactor.spawned), 1)
        self.assertTrue(reactor.process.alive)
        self.assertTrue(router.members["c"].status.recovering)  # a request would start it
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
