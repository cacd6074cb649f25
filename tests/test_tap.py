"""Tests for llamaproxy.tap and the twistd plugin: options, startup errors, the service tree."""

from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.service import GatewayService
from llamaproxy.tap import Options, makeService
from tests.e2e.harness import twistd as twistd_script

ROOT = Path(__file__).resolve().parent.parent


class OptionsTests(SynchronousTestCase):
    def parse(self, argv: list[str], env: dict[str, str]) -> Options:
        self.patch(os, "environ", env)
        options = Options()
        options.parseOptions(argv)
        return options

    def test_external_backend(self) -> None:
        options = self.parse(["--listen", "tcp:1", "--listen", "tcp:2"],
                             {"BACKEND_URL": "http://127.0.0.1:9", "AUTH_ENABLED": "no"})
        assert options.config is not None
        self.assertEqual(options.config.endpoints, ("tcp:1", "tcp:2"))
        self.assertFalse(options.config.auth_enabled)
        self.assertFalse(options.config.supervised)

    def test_invalid_value_names_the_variable(self) -> None:
        with self.assertRaises(UsageError) as raised:
            self.parse([], {"BACKEND_URL": "http://127.0.0.1:9", "AUTH_ENABLED": "maybe"})
        self.assertIn("AUTH_ENABLED", str(raised.exception))
        with self.assertRaises(UsageError) as raised:
            self.parse(["--request-timeout", "soon"], {"BACKEND_URL": "http://127.0.0.1:9"})
        self.assertIn("--request-timeout", str(raised.exception))

    def test_missing_llama_server_is_a_startup_error(self) -> None:
        model = self.mktemp()
        Path(model).write_bytes(b"GGUF")
        with self.assertRaises(UsageError) as raised:
            self.parse([], {"MODEL_PATH": model, "LLAMA_SERVER": "/nonexistent/llama-server",
                            "PATH": "/nonexistent"})
        self.assertIn("/nonexistent/llama-server", str(raised.exception))

    def test_help_documents_every_option(self) -> None:
        text = str(Options())
        for flag in ("--listen", "--port", "--model", "--auth-enabled", "--backend-url",
                     "--ready-timeout", "AUTH_ENABLED", "PORT_HEALTH"):
            self.assertIn(flag, text)


class MakeServiceTests(SynchronousTestCase):
    def test_service_tree_listens_and_stops(self) -> None:
        keys = self.mktemp()
        Path(keys).write_text("a:sk-aaaaaaaaaaaaaaaa\n")
        self.patch(os, "environ", {"BACKEND_URL": "http://127.0.0.1:9", "AUTH_KEYS_FILE": keys,
                                   "PORT": "8123", "PORT_HEALTH": "8124", "HOST": "127.0.0.1",
                                   "METRICS_LISTEN": "tcp:8125", "USAGE_LEDGER": "off",
                                   "ACCESS_LOG": self.mktemp()})
        options = Options()
        options.parseOptions([])
        reactor = MemoryReactorClock()
        service = makeService(options, reactor=reactor)
        self.assertIsInstance(service, GatewayService)
        service.startService()
        ports = sorted(port for port, *_ in reactor.tcpServers)
        self.assertEqual(ports, [8123, 8124, 8125])
        # the external backend is probed at once
        self.assertTrue(reactor.tcpClients)
        self.successResultOf(service.stopService())


    def test_operator_page_listens_and_stops(self) -> None:
        from llamaproxy.admin.service import OperatorPageService

        keys = self.mktemp()
        Path(keys).write_text("boss:sk-bbbbbbbbbbbbbbbb\n")
        self.patch(os, "environ", {"BACKEND_URL": "http://127.0.0.1:9", "AUTH_KEYS_FILE": keys,
                                   "PORT": "8123", "PORT_HEALTH": "0", "HOST": "127.0.0.1",
                                   "USAGE_LEDGER": "off", "ACCESS_LOG": "off",
                                   "ADMIN_LISTEN": "tcp:8126:interface=127.0.0.1",
                                   "ADMIN_KEY_IDS": "boss"})
        options = Options()
        options.parseOptions([])
        reactor = MemoryReactorClock()
        service = makeService(options, reactor=reactor)
        assert isinstance(service, GatewayService)
        [page] = [s for s in service.background if isinstance(s, OperatorPageService)]
        service.startService()
        self.assertIn((8126, "127.0.0.1"),
                      [(port, interface) for port, _, _, interface in reactor.tcpServers])
        self.assertTrue(page.sampler._loop.running)
        self.successResultOf(service.stopService())
        self.assertFalse(page.sampler._loop.running)

    def test_no_operator_page_by_default(self) -> None:
        from llamaproxy.admin.service import OperatorPageService

        self.patch(os, "environ", {"BACKEND_URL": "http://127.0.0.1:9", "AUTH_ENABLED": "no",
                                   "PORT_HEALTH": "0", "USAGE_LEDGER": "off",
                                   "ACCESS_LOG": "off"})
        options = Options()
        options.parseOptions([])
        service = makeService(options, reactor=MemoryReactorClock())
        assert isinstance(service, GatewayService)
        self.assertFalse([s for s in service.background if isinstance(s, OperatorPageService)])


class SharedStateWiringTests(SynchronousTestCase):
    """Issue 21: STATE_URL wires the shared state; without it nothing of Redis exists."""

    def test_state_url_wires_the_shared_state(self) -> None:
        from llamaproxy.state.redis_store import RedisState
        from llamaproxy.state.slot_leases import SharedSlots
        from llamaproxy.state.usage_counters import SharedUsage

        self.patch(os, "environ", {"BACKEND_URL": "http://127.0.0.1:9", "AUTH_ENABLED": "no",
                                   "PORT_HEALTH": "0", "USAGE_LEDGER": "off",
                                   "ACCESS_LOG": "off", "STATE_URL": "redis://127.0.0.1:6390/1",
                                   "STATE_FAILURE": "closed"})
        options = Options()
        options.parseOptions([])
        reactor = MemoryReactorClock()
        service = makeService(options, reactor=reactor)
        assert isinstance(service, GatewayService)
        kinds = [type(s) for s in service.background]
        # Redis is stopped last: what gives leases back and flushes usage needs it until then.
        self.assertEqual(kinds[-2:], [SharedSlots, RedisState])
        self.assertIn(SharedUsage, kinds)
        self.assertIsNotNone(service.resource.access.shared)
        service.startService()
        self.assertIn(("127.0.0.1", 6390), [(h, p) for h, p, *_ in reactor.tcpClients])
        self.successResultOf(service.stopService())

    def test_no_state_url_no_redis(self) -> None:
        self.patch(os, "environ", {"BACKEND_URL": "http://127.0.0.1:9", "AUTH_ENABLED": "no",
                                   "PORT_HEALTH": "0", "USAGE_LEDGER": "off",
                                   "ACCESS_LOG": "off"})
        options = Options()
        options.parseOptions([])
        service = makeService(options, reactor=MemoryReactorClock())
        assert isinstance(service, GatewayService)
        self.assertIsNone(service.resource.access.shared)
        self.assertNotIn("RedisState", [type(s).__name__ for s in service.background])


class FastPathSwitchTests(SynchronousTestCase):
    """Issue 17: FAST_PATHS=off runs the stock path; auto falls back to it, with one warning,
    when the contract check fails (here: not the epoll reactor), and keeps serving."""

    def build(self, mode: str) -> tuple[GatewayService, MemoryReactorClock]:
        self.patch(os, "environ", {"BACKEND_URL": "http://127.0.0.1:9", "AUTH_ENABLED": "no",
                                   "PORT": "8123", "PORT_HEALTH": "0", "USAGE_LEDGER": "off",
                                   "ACCESS_LOG": "off", "FAST_PATHS": mode})
        options = Options()
        options.parseOptions([])
        reactor = MemoryReactorClock()
        service = makeService(options, reactor=reactor)
        assert isinstance(service, GatewayService)
        return service, reactor

    def assert_stock(self, service: GatewayService, reactor: MemoryReactorClock) -> None:
        from twisted.internet.testing import StringTransport

        from llamaproxy.backends.forward import StockAgent

        self.assertIsInstance(service.resource.agent, StockAgent)
        self.assertIsNone(service.gc_schedule)
        [(_, factory, *_)] = reactor.tcpServers
        self.assertIsNone(factory.cork)
        self.assertNotIn("llamaproxy_read_lanes", vars(reactor))
        channel = factory.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        self.assertIsNone(channel.sender)
        channel.dataReceived(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"))

    def test_off(self) -> None:
        service, reactor = self.build("off")
        service.startService()
        self.assert_stock(service, reactor)
        self.assertEqual(service.resource.health_document()["fast_paths"],
                         {"mode": "off", "active": []})
        self.successResultOf(service.stopService())

    def test_auto_falls_back_when_the_contract_fails(self) -> None:
        from twisted.logger import LogLevel, globalLogPublisher

        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service, reactor = self.build("auto")
        service.startService()
        self.assert_stock(service, reactor)
        fast = service.resource.health_document()["fast_paths"]
        self.assertEqual(fast["mode"], "auto")  # type: ignore[index]
        self.assertIn("the reactor is MemoryReactorClock, not the epoll reactor",
                      fast["failed_checks"])  # type: ignore[index]
        warnings = [e for e in events if e.get("log_level") == LogLevel.warn
                    and "Fast paths off" in str(e.get("log_format"))]
        self.assertEqual(len(warnings), 1)
        self.successResultOf(service.stopService())

    def test_invalid_value(self) -> None:
        self.patch(os, "environ", {"BACKEND_URL": "http://127.0.0.1:9", "FAST_PATHS": "fast"})
        self.assertRaises(UsageError, Options().parseOptions, [])


class PluginTests(SynchronousTestCase):
    def test_plugin_is_found(self) -> None:
        makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "llamaproxy"]
        self.assertEqual(len(makers), 1)

    def test_plugin_file_imports_only_service_maker(self) -> None:
        tree = ast.parse((ROOT / "twisted" / "plugins" / "llamaproxy_plugin.py").read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        self.assertEqual(len(imports), 1)
        node = imports[0]
        assert isinstance(node, ast.ImportFrom)
        self.assertEqual((node.module, [a.name for a in node.names]),
                         ("twisted.application.service", ["ServiceMaker"]))

    def test_twistd_lists_and_documents_llamaproxy(self) -> None:
        twistd = [twistd_script()]
        listing = subprocess.run([*twistd, "--help"], capture_output=True, text=True, timeout=60)
        self.assertIn("llamaproxy", listing.stdout)
        help_text = subprocess.run([*twistd, "llamaproxy", "--help"], capture_output=True,
                                   text=True, timeout=60)
        self.assertIn("--backend-url", help_text.stdout)
        self.assertIn("MAX_QUEUE_SIZE", help_text.stdout)

    def test_twistd_refuses_a_bad_value(self) -> None:
        env = {**os.environ, "BACKEND_URL": "http://127.0.0.1:9", "AUTH_ENABLED": "yes please"}
        result = subprocess.run(
            [twistd_script(), "-n", "--pidfile=", "llamaproxy"],
            capture_output=True, text=True, timeout=60, env=env, cwd=self.mktemp_dir(),
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("AUTH_ENABLED", result.stdout + result.stderr)

    def mktemp_dir(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path
