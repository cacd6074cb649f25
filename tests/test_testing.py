"""Tests for the public fakes in llamaproxy.testing."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.error import (
    ConnectionRefusedError,
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.interfaces import IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from zope.interface.verify import verifyObject

from llamaproxy.testing import AgentSpy, FakeProcessReactor, StubResponse


class RecordingProtocol(ProcessProtocol):
    """Records everything a process protocol is told."""

    def __init__(self) -> None:
        self.connected = False
        self.data: list[tuple[int, bytes]] = []
        self.exited: list[Failure] = []
        self.ended: list[Failure] = []

    def connectionMade(self) -> None:
        self.connected = True

    def childDataReceived(self, childFD: int, data: bytes) -> None:  # noqa: N803
        self.data.append((childFD, data))

    def processExited(self, reason: Failure) -> None:
        self.exited.append(reason)

    def processEnded(self, reason: Failure) -> None:
        self.ended.append(reason)


class FakeProcessReactorTests(SynchronousTestCase):
    """FakeProcessReactor and FakeProcessTransport."""

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.protocol = RecordingProtocol()

    def spawn(self) -> None:
        self.reactor.spawnProcess(
            self.protocol, "/bin/prog", ["/bin/prog", "-x"], env={"A": "1"}, path="/tmp"
        )

    def test_interfaces(self) -> None:
        self.spawn()
        verifyObject(IReactorProcess, self.reactor)
        verifyObject(IReactorTime, self.reactor)
        verifyObject(IProcessTransport, self.reactor.process)

    def test_spawn_records(self) -> None:
        self.spawn()
        process = self.reactor.process
        self.assertEqual(
            (process.executable, process.args, process.env, process.path),
            ("/bin/prog", ["/bin/prog", "-x"], {"A": "1"}, "/tmp"),
        )
        self.assertTrue(self.protocol.connected)
        self.assertIs(self.protocol.transport, process)
        self.assertEqual(process.pid, 4242)
        self.spawn()
        self.assertEqual(self.reactor.process.pid, 4243)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_spawn_error(self) -> None:
        self.reactor.spawn_error = OSError("nope")
        self.assertRaises(OSError, self.spawn)
        self.assertEqual(self.reactor.spawned, [])
        self.assertRaises(AssertionError, lambda: self.reactor.process)

    def test_output(self) -> None:
        self.spawn()
        self.reactor.process.write_stdout(b"out")
        self.reactor.process.write_stderr(b"err")
        self.assertEqual(self.protocol.data, [(1, b"out"), (2, b"err")])

    def test_exit_codes(self) -> None:
        self.spawn()
        self.reactor.process.exit(0)
        self.assertIsInstance(self.protocol.ended[0].value, ProcessDone)
        self.assertEqual(len(self.protocol.exited), 1)
        self.assertFalse(self.reactor.process.alive)
        self.assertRaises(ProcessExitedAlready, self.reactor.process.exit, 0)
        self.spawn()
        self.reactor.process.exit(3)
        self.assertIsInstance(self.protocol.ended[1].value, ProcessTerminated)
        self.assertEqual(self.protocol.ended[1].value.exitCode, 3)
        self.spawn()
        self.reactor.process.kill_by_signal(9)
        self.assertEqual(self.protocol.ended[2].value.signal, 9)
        self.assertIsNone(self.protocol.ended[2].value.exitCode)

    def test_signals_recorded(self) -> None:
        self.spawn()
        process = self.reactor.process
        process.signalProcess("TERM")
        process.signalProcess("KILL")
        self.assertEqual(process.signals, ["TERM", "KILL"])
        self.assertTrue(process.alive)  # a passive process ignores signals
        process.exit(0)
        self.assertRaises(ProcessExitedAlready, process.signalProcess, "TERM")

    def test_responding_to_signals(self) -> None:
        self.reactor.respond_to_signals = True
        self.reactor.term_delay = 2.0
        self.spawn()
        self.reactor.process.signalProcess("TERM")
        self.reactor.advance(1.9)
        self.assertEqual(self.protocol.ended, [])
        self.reactor.advance(0.1)
        self.assertIsInstance(self.protocol.ended[0].value, ProcessDone)
        self.spawn()
        self.reactor.process.signalProcess("TERM")
        self.reactor.process.signalProcess("KILL")
        self.assertEqual(self.protocol.ended[1].value.signal, 9)
        self.reactor.advance(2.0)  # the TERM's delayed exit finds it gone already
        self.assertEqual(len(self.protocol.ended), 2)


class AgentSpyTests(SynchronousTestCase):
    """AgentSpy, RequestRecord and StubResponse."""

    def test_interface(self) -> None:
        verifyObject(IAgent, AgentSpy())
        verifyObject(IResponse, StubResponse())

    def test_records_and_responds(self) -> None:
        agent = AgentSpy()
        d = agent.request(b"POST", b"http://x/y", Headers({b"a": [b"b"]}))
        [record] = agent.requests
        self.assertEqual((record.method, record.uri), (b"POST", b"http://x/y"))
        self.assertEqual(agent.pending, [record])
        self.assertNoResult(d)
        record.respond(201, b"hello", Headers({b"content-type": [b"text/plain"]}))
        response = self.successResultOf(d)
        self.assertEqual(response.code, 201)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/plain"])
        self.assertEqual(self.successResultOf(readBody(response)), b"hello")
        self.assertEqual(agent.pending, [])

    def test_fail(self) -> None:
        agent = AgentSpy()
        d = agent.request(b"GET", b"http://x/")
        agent.requests[0].fail(ConnectionRefusedError())
        self.failureResultOf(d, ConnectionRefusedError)

    def test_cancel(self) -> None:
        agent = AgentSpy()
        d = agent.request(b"GET", b"http://x/")
        self.assertFalse(agent.requests[0].cancelled)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(agent.requests[0].cancelled)

    def test_on_request(self) -> None:
        agent = AgentSpy(lambda r: r.respond(204))
        self.assertEqual(self.successResultOf(agent.request(b"GET", b"http://x/")).code, 204)

    def test_type_checks(self) -> None:
        agent = AgentSpy()
        self.assertRaises(TypeError, agent.request, "GET", b"http://x/")
        self.assertRaises(TypeError, agent.request, b"GET", "http://x/")
        self.assertRaises(TypeError, agent.request, b"GET", b"http://x/", {"a": "b"})
        self.assertEqual(agent.requests, [])

    def test_empty_body(self) -> None:
        self.assertEqual(self.successResultOf(readBody(StubResponse(200))), b"")


class FakeSupervisorTests(SynchronousTestCase):
    def test_states(self) -> None:
        from twisted.internet.task import Clock

        from llamaproxy.backends.backend import Backend, BackendState
        from llamaproxy.testing import FakeSupervisor

        clock = Clock()
        backend = Backend("b", "http://127.0.0.1:1")
        child = FakeSupervisor(backend, clock, load_time=2, stop_delay=1)
        child.startService()
        self.assertEqual((child.running, child.starts, backend.state),
                         (1, 1, BackendState.STARTING))
        clock.advance(2)
        self.assertEqual(backend.state, BackendState.READY)
        stopped = child.stopService()
        self.assertEqual((child.running, backend.state), (0, BackendState.STOPPING))
        self.assertNoResult(stopped)
        clock.advance(1)
        self.successResultOf(stopped)
        self.assertEqual(backend.state, BackendState.STOPPED)
        child.startService()
        child.crash("exit code 1")
        self.assertEqual((backend.state, backend.last_exit), (BackendState.BACKOFF, "exit code 1"))
        self.successResultOf(child.stopService())  # no process: at once
        self.assertEqual((backend.state, child.stops), (BackendState.STOPPED, 2))
