"""Tests for llamaproxy.supervision.supervisor, on a fake process reactor and a scripted health
endpoint."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from typing import Any, cast

from twisted.internet.error import ConnectionRefusedError, ProcessDone
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llamaproxy.backends.backend import Backend, BackendState
from llamaproxy.supervision.llama_server import BackendKeyFile
from llamaproxy.supervision.supervisor import (
    CHILD_LOG_NAMESPACE,
    LineSplitter,
    LlamaServerSupervisor,
    SupervisorTimings,
)
from llamaproxy.testing import AgentSpy, FakeProcessReactor, FakeProcessTransport, RequestRecord
from tests.supervision.test_llama_server import make_config

EXECUTABLE = "/opt/llama/llama-server"
TIMINGS = SupervisorTimings(
    ready_timeout=60.0,
    stop_timeout=10.0,
    backoff_max=60.0,
    backoff_reset=30.0,
    probe_interval=5.0,
    health_timeout=2.0,
    startup_probe_interval=0.5,
    not_ready_retry_after=5.0,
)


class SupervisorTestCase(SynchronousTestCase):
    """A supervisor on a FakeProcessReactor whose /health answers as ``self.health`` says.

    ``self.health`` is "refused", "hang" (never answers) or an HTTP status code.
    """

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.reactor.advance(1000)
        self.health: str | int = "refused"
        self.agent = AgentSpy(self._answer)
        self.backend = Backend(name="local", base_url="http://127.0.0.1:8080")
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.key_file = BackendKeyFile(os.path.join(self.tmp, "keys"), "test")
        self.args = ["-m", "/models/tiny.gguf", "--api-key-file", self.key_file.path]
        self.supervisor = LlamaServerSupervisor(
            backend=self.backend,
            executable=EXECUTABLE,
            args=self.args,
            env={"PATH": "/usr/bin", "HOME": "/root"},
            key_file=self.key_file,
            reactor=self.reactor,
            agent=self.agent,
            timings=TIMINGS,
            jitter=lambda: 0.0,
        )
        self.events = EventLoggingObserver.createWithCleanup(
            cast(TestCase, self), globalLogPublisher
        )

    def _answer(self, record: RequestRecord) -> None:
        if self.health == "refused":
            record.fail(ConnectionRefusedError())
        elif self.health == "hang":
            pass
        else:
            body = b'{"status":"ok"}' if self.health == 200 else b""
            record.respond(int(self.health), body)

    @property
    def process(self) -> FakeProcessTransport:
        return self.reactor.process

    def now(self) -> float:
        return self.reactor.seconds()

    def start_ready(self) -> None:
        """Start the supervisor and let the child become ready at once."""
        self.health = 200
        self.supervisor.startService()
        self.reactor.advance(TIMINGS.startup_probe_interval)
        self.assertIs(self.backend.state, BackendState.READY)

    def messages(self, level: LogLevel | None = None, namespace: str | None = None) -> list[str]:
        from twisted.logger import formatEvent

        return [
            formatEvent(e)
            for e in self.events
            if (level is None or e["log_level"] is level)
            and (namespace is None or e["log_namespace"] == namespace)
        ]


class StartTests(SupervisorTestCase):
    """Spawning, the key file, and the way to READY."""

    def test_spawn(self) -> None:
        self.supervisor.startService()
        self.assertEqual(len(self.reactor.spawned), 1)
        process = self.process
        self.assertEqual(process.executable, EXECUTABLE)
        self.assertEqual(process.args, [EXECUTABLE, *self.args])
        self.assertEqual(process.env, {"PATH": "/usr/bin", "HOME": "/root"})
        self.assertIs(self.backend.state, BackendState.STARTING)
        self.assertEqual(self.supervisor.pid, process.pid)
        self.assertTrue(self.supervisor.running)
        self.assertEqual(self.backend.retry_after(self.now()), 5)

    def test_key_file_written(self) -> None:
        self.supervisor.startService()
        self.assertTrue(self.key_file.written)
        mode = stat.S_IMODE(os.stat(self.key_file.path).st_mode)
        self.assertEqual(mode, 0o600)
        with open(self.key_file.path) as f:
            self.assertEqual(f.read().strip(), self.key_file.key)

    def test_key_file_not_rewritten(self) -> None:
        self.key_file.write()
        inode = os.stat(self.key_file.path).st_ino
        self.supervisor.startService()
        self.assertEqual(os.stat(self.key_file.path).st_ino, inode)

    def test_no_key_file(self) -> None:
        supervisor = LlamaServerSupervisor(
            self.backend, EXECUTABLE, [], {}, None, self.reactor, self.agent, TIMINGS
        )
        supervisor.startService()
        self.process.exit(0)
        self.successResultOf(supervisor.stopService())

    def test_command_logged_without_key(self) -> None:
        self.supervisor.startService()
        [start] = [m for m in self.messages() if m.startswith("Starting llama-server")]
        self.assertIn(EXECUTABLE, start)
        self.assertIn(self.key_file.path, start)
        for message in self.messages():
            self.assertNotIn(self.key_file.key, message)

    def test_starting_loading_ready(self) -> None:
        self.supervisor.startService()
        self.assertEqual(self.agent.requests, [])  # the first probe waits one interval
        self.reactor.advance(0.5)
        self.assertEqual(self.agent.requests[0].uri, b"http://127.0.0.1:8080/health")
        self.assertIs(self.backend.state, BackendState.STARTING)
        self.assertEqual(self.backend.last_probe.detail, "connection refused")  # type: ignore[union-attr]

        self.health = 503
        self.reactor.advance(0.5)
        self.assertIs(self.backend.state, BackendState.LOADING)
        self.assertFalse(self.backend.ready)
        self.assertEqual(self.backend.retry_at, self.now() + 5.0)

        self.health = 200
        self.reactor.advance(0.5)
        self.assertIs(self.backend.state, BackendState.READY)
        self.assertTrue(self.backend.ready)
        self.assertIsNone(self.backend.retry_at)
        self.assertEqual(self.supervisor.ready_since, self.now())
        self.assertIn("llama-server ready after 1.5 s (pid 4242)", self.messages(LogLevel.info))

    def test_probes_slow_down_when_ready(self) -> None:
        self.start_ready()
        count = len(self.agent.requests)
        self.reactor.advance(4.9)
        self.assertEqual(len(self.agent.requests), count)
        self.reactor.advance(0.1)
        self.assertEqual(len(self.agent.requests), count + 1)

    def test_failed_probe_when_ready(self) -> None:
        """Recorded in last_probe (so not ready), warned about once, and recovered from."""
        self.start_ready()
        self.health = 500
        self.reactor.advance(5.0)
        self.assertIs(self.backend.state, BackendState.READY)
        self.assertFalse(self.backend.ready)
        self.assertEqual(self.backend.last_probe.detail, "HTTP 500")  # type: ignore[union-attr]
        self.reactor.advance(0.5)  # probed fast while failing
        self.reactor.advance(0.5)
        warnings = self.messages(LogLevel.warn)
        self.assertEqual(len(warnings), 1)
        self.assertIn("failed its health probe", warnings[0])
        self.health = 200
        self.reactor.advance(0.5)
        self.assertTrue(self.backend.ready)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_hanging_probe_times_out(self) -> None:
        self.start_ready()
        self.health = "hang"
        self.reactor.advance(5.0)
        self.assertTrue(self.backend.ready)
        self.reactor.advance(2.0)
        self.assertFalse(self.backend.ready)
        self.assertEqual(self.backend.last_probe.detail, "timed out after 2s")  # type: ignore[union-attr]

    def test_ready_timeout_cancelled_when_ready(self) -> None:
        self.start_ready()
        self.reactor.advance(TIMINGS.ready_timeout * 2)
        self.assertEqual(self.process.signals, [])
        self.assertTrue(self.backend.ready)

    def test_spawn_failure(self) -> None:
        self.reactor.spawn_error = OSError("no such file")
        self.supervisor.startService()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertIs(self.backend.state, BackendState.BACKOFF)
        self.assertEqual(self.backend.last_exit, "could not start: no such file")
        self.assertEqual(self.backend.restarts, 1)
        self.reactor.spawn_error = None
        self.reactor.advance(1.0)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.assertIs(self.backend.state, BackendState.STARTING)


class ReadyTimeoutTests(SupervisorTestCase):
    """A child that does not become ready in time is killed and restarted."""

    def test_timeout_term_kill_backoff(self) -> None:
        self.health = 503
        self.supervisor.startService()
        self.reactor.advance(TIMINGS.ready_timeout - 0.1)
        self.assertEqual(self.process.signals, [])
        self.reactor.advance(0.1)
        self.assertEqual(self.process.signals, ["TERM"])
        self.assertIn("was not ready within 60 s", self.messages(LogLevel.error)[0])
        requests = len(self.agent.requests)
        self.reactor.advance(TIMINGS.stop_timeout)
        self.assertEqual(self.process.signals, ["TERM", "KILL"])
        self.assertEqual(len(self.agent.requests), requests)  # no probing while killing it
        self.process.kill_by_signal(9)
        self.assertIs(self.backend.state, BackendState.BACKOFF)
        self.assertEqual(self.backend.restarts, 1)
        self.assertEqual(
            self.backend.last_exit,
            "not ready within 60 s; signal 9 (SIGKILL): killed (out of memory, or SIGKILL)",
        )
        self.reactor.advance(1.0)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_exits_on_term(self) -> None:
        self.health = "refused"
        self.supervisor.startService()
        self.reactor.advance(TIMINGS.ready_timeout)
        self.process.exit(0)
        self.assertIs(self.backend.state, BackendState.BACKOFF)
        self.assertEqual(self.process.signals, ["TERM"])
        self.assertEqual(
            self.backend.last_exit, "not ready within 60 s; exit code 0: exited normally"
        )
        # The KILL escalation was cancelled with the process gone.
        self.reactor.advance(TIMINGS.stop_timeout)
        self.assertEqual(self.reactor.spawned[0].signals, ["TERM"])


class CrashTests(SupervisorTestCase):
    """Crashes: BACKOFF, exponential delays, reset after a long enough ready period."""

    def crash_and_measure(self, code: int = 1) -> float:
        """Crash the current child; return the restart delay, after checking it exactly."""
        before = len(self.reactor.spawned)
        self.process.exit(code)
        self.assertIs(self.backend.state, BackendState.BACKOFF)
        assert self.backend.retry_at is not None
        delay = self.backend.retry_at - self.now()
        self.reactor.advance(delay - 0.01)
        self.assertEqual(len(self.reactor.spawned), before)
        self.reactor.advance(0.01)
        self.assertEqual(len(self.reactor.spawned), before + 1)
        self.assertIs(self.backend.state, BackendState.STARTING)
        return delay

    def test_exponential_backoff(self) -> None:
        self.supervisor.startService()
        delays = [self.crash_and_measure() for _ in range(9)]
        self.assertEqual(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60])
        self.assertEqual(self.backend.restarts, 9)
        self.assertEqual(self.supervisor.restart_count, 9)

    def test_last_exit_and_log(self) -> None:
        self.supervisor.startService()
        self.process.exit(1)
        self.assertEqual(
            self.backend.last_exit,
            "exit code 1: bad model file, unsupported model, or port already in use",
        )
        [error] = [e for e in self.events if e["log_level"] is LogLevel.error]
        self.assertEqual(error["exit_code"], 1)
        self.assertEqual(error["delay"], 1.0)
        self.assertIn("bad model file", error["exit"])

    def test_last_exit_says_what_the_child_said(self) -> None:
        self.supervisor.startService()
        self.process.write_stderr(
            b"0.00.001.000 I srv    main: starting\n"
            b'error while handling argument "--api-key-file": error: failed to open file '
            b"'/dev/shm/llama-keys/backend-vm.key'\n\nusage:\n")
        self.process.exit(1)
        self.assertEqual(
            self.backend.last_exit,
            'exit code 1: error while handling argument "--api-key-file": error: failed to open '
            "file '/dev/shm/llama-keys/backend-vm.key'",
        )
        self.assertEqual(self.backend.status_json()["last_exit"], self.backend.last_exit)

    def test_error_lines_before_ready_do_not_explain_a_later_crash(self) -> None:
        self.supervisor.startService()
        self.process.write_stderr(b"0.00.001.000 E load: a warning-ish error while loading\n")
        self.health = 200
        self.reactor.advance(TIMINGS.startup_probe_interval)
        self.assertEqual(self.backend.state, BackendState.READY)
        self.process.kill_by_signal(11)
        self.assertEqual(self.backend.last_exit, "signal 11 (SIGSEGV): segmentation fault")

    def test_key_file_removed_behind_its_back_is_written_again(self) -> None:
        self.supervisor.startService()
        os.unlink(self.key_file.path)
        self.process.exit(1)
        self.reactor.advance(1)  # the restart
        with open(self.key_file.path) as f:
            self.assertEqual(f.read().strip(), self.key_file.key)

    def test_segfault(self) -> None:
        self.supervisor.startService()
        self.process.kill_by_signal(11)
        self.assertEqual(self.backend.last_exit, "signal 11 (SIGSEGV): segmentation fault")

    def test_reset_after_ready_long_enough(self) -> None:
        self.supervisor.startService()
        self.assertEqual(self.crash_and_measure(), 1)
        self.assertEqual(self.crash_and_measure(), 2)
        self.health = 200
        self.reactor.advance(0.5)
        self.assertTrue(self.backend.ready)
        self.reactor.advance(TIMINGS.backoff_reset)
        self.assertEqual(self.crash_and_measure(), 1)

    def test_no_reset_when_ready_briefly(self) -> None:
        self.supervisor.startService()
        self.assertEqual(self.crash_and_measure(), 1)
        self.assertEqual(self.crash_and_measure(), 2)
        self.health = 200
        self.reactor.advance(0.5)
        self.assertTrue(self.backend.ready)
        self.reactor.advance(TIMINGS.backoff_reset - 1)
        self.assertEqual(self.crash_and_measure(), 4)

    def test_jitter_added(self) -> None:
        supervisor = LlamaServerSupervisor(
            self.backend,
            EXECUTABLE,
            [],
            {},
            None,
            self.reactor,
            self.agent,
            TIMINGS,
            jitter=lambda: 0.25,
        )
        supervisor.startService()
        self.process.exit(1)
        self.assertEqual(self.backend.retry_at, self.now() + 1.25)
        self.successResultOf(supervisor.stopService())

    def test_crash_when_ready_no_probe_left(self) -> None:
        self.start_ready()
        self.process.exit(1)
        self.assertFalse(self.backend.ready)
        requests = len(self.agent.requests)
        self.reactor.advance(0.99)
        self.assertEqual(len(self.agent.requests), requests)  # the old child's loop is gone

    def test_old_child_ignored(self) -> None:
        """An ended event from a child already replaced does not disturb the new one."""
        self.supervisor.startService()
        old = self.process
        old_protocol = old.proto
        self.crash_and_measure()
        old_protocol.processEnded(Failure(ProcessDone(0)))
        self.assertIs(self.backend.state, BackendState.STARTING)
        self.assertEqual(self.backend.restarts, 1)


class StopTests(SupervisorTestCase):
    """stopService: TERM, KILL after stop_timeout, fires only once the child is reaped."""

    def test_term_then_kill(self) -> None:
        self.start_ready()
        d = self.supervisor.stopService()
        self.assertIs(self.backend.state, BackendState.STOPPING)
        self.assertEqual(self.process.signals, ["TERM"])
        self.assertNoResult(d)
        self.reactor.advance(TIMINGS.stop_timeout - 0.1)
        self.assertEqual(self.process.signals, ["TERM"])
        self.reactor.advance(0.1)
        self.assertEqual(self.process.signals, ["TERM", "KILL"])
        self.assertNoResult(d)
        self.assertTrue(os.path.exists(self.key_file.path))
        self.process.kill_by_signal(9)
        self.successResultOf(d)
        self.assertIs(self.backend.state, BackendState.STOPPED)
        self.assertFalse(os.path.exists(self.key_file.path))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertIsNone(self.supervisor.pid)

    def test_term_suffices(self) -> None:
        self.start_ready()
        d = self.supervisor.stopService()
        self.reactor.advance(1.0)
        self.process.exit(0)
        self.successResultOf(d)
        self.assertEqual(self.process.signals, ["TERM"])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.backend.restarts, 0)

    def test_with_reacting_process(self) -> None:
        """With a fake process that obeys signals (as other components' tests will use it)."""
        self.reactor.respond_to_signals = True
        self.reactor.term_delay = 0.2
        self.start_ready()
        d = self.supervisor.stopService()
        self.assertNoResult(d)
        self.reactor.advance(0.2)
        self.successResultOf(d)

    def test_no_restart_after_stop(self) -> None:
        self.start_ready()
        d = self.supervisor.stopService()
        self.process.exit(1)  # even a non-zero exit while stopping is not a crash
        self.successResultOf(d)
        self.reactor.advance(1000)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.assertEqual(self.backend.restarts, 0)
        self.assertIs(self.backend.state, BackendState.STOPPED)

    def test_stop_during_backoff(self) -> None:
        self.supervisor.startService()
        self.process.exit(1)
        self.assertIs(self.backend.state, BackendState.BACKOFF)
        d = self.supervisor.stopService()
        self.successResultOf(d)
        self.assertIs(self.backend.state, BackendState.STOPPED)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(1000)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.assertFalse(os.path.exists(self.key_file.path))

    def test_stop_while_loading(self) -> None:
        self.health = 503
        self.supervisor.startService()
        self.reactor.advance(1.0)
        self.assertIs(self.backend.state, BackendState.LOADING)
        d = self.supervisor.stopService()
        self.assertEqual(len(self.agent.pending), 0)
        self.process.exit(0)
        self.successResultOf(d)
        self.reactor.advance(TIMINGS.ready_timeout * 2)
        self.assertEqual(self.process.signals, ["TERM"])  # no ready-timeout kill later

    def test_stop_twice(self) -> None:
        self.start_ready()
        first = self.supervisor.stopService()
        second = self.supervisor.stopService()
        self.assertEqual(self.process.signals, ["TERM"])
        self.reactor.advance(TIMINGS.stop_timeout)  # the second call kept the KILL armed
        self.assertEqual(self.process.signals, ["TERM", "KILL"])
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.process.kill_by_signal(9)
        self.successResultOf(first)
        self.successResultOf(second)
        self.successResultOf(self.supervisor.stopService())

    def test_stop_during_ready_timeout_kill(self) -> None:
        self.health = 503
        self.supervisor.startService()
        self.reactor.advance(TIMINGS.ready_timeout)
        self.assertEqual(self.process.signals, ["TERM"])
        d = self.supervisor.stopService()
        self.reactor.advance(TIMINGS.stop_timeout)
        self.assertEqual(self.process.signals, ["TERM", "KILL"])
        self.process.kill_by_signal(9)
        self.successResultOf(d)
        self.assertIs(self.backend.state, BackendState.STOPPED)
        self.assertEqual(self.backend.restarts, 0)

    def test_exited_but_not_reaped(self) -> None:
        """signalProcess raising ProcessExitedAlready: wait for processEnded all the same."""
        self.start_ready()
        protocol = self.process.proto
        self.process.pid = None  # gone, but processEnded not delivered yet
        d = self.supervisor.stopService()
        self.assertNoResult(d)
        protocol.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(d)
        self.assertIs(self.backend.state, BackendState.STOPPED)

    def test_stop_before_start(self) -> None:
        self.successResultOf(self.supervisor.stopService())
        self.assertIs(self.backend.state, BackendState.STOPPED)
        self.assertEqual(self.reactor.spawned, [])

    def test_start_again_after_stop(self) -> None:
        self.start_ready()
        d = self.supervisor.stopService()
        self.process.exit(0)
        self.successResultOf(d)
        self.supervisor.startService()
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertTrue(os.path.exists(self.key_file.path))
        self.reactor.advance(0.5)
        self.assertTrue(self.backend.ready)


class OutputTests(SupervisorTestCase):
    """The child's stdout and stderr become log events, one per line."""

    def child_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["log_namespace"] == CHILD_LOG_NAMESPACE]

    def test_lines(self) -> None:
        self.supervisor.startService()
        self.process.write_stderr(b"main: loading model\nsrv  load_mo")
        self.process.write_stderr(b"del: done\r\n")
        self.process.write_stdout(b"no newline at the end")
        self.assertEqual(
            [(e["line"], e["stream"]) for e in self.child_events()],
            [("main: loading model", "stderr"), ("srv  load_model: done", "stderr")],
        )
        self.process.exit(0)
        events = self.child_events()
        self.assertEqual(
            (events[-1]["line"], events[-1]["stream"]), ("no newline at the end", "stdout")
        )
        self.assertEqual({e["pid"] for e in events}, {4242})
        self.assertEqual({e["log_level"] for e in events}, {LogLevel.info})

    def test_braces_in_lines(self) -> None:
        from twisted.logger import formatEvent

        self.supervisor.startService()
        self.process.write_stdout(b'{"tokens": 3}\n')
        [event] = self.child_events()
        self.assertEqual(formatEvent(event), '{"tokens": 3}')


class RequestLineLevelTests(SupervisorTestCase):
    """Issue 16.12: llama-server's per-request lines at CHILD_REQUEST_LOG_LEVEL (debug)."""

    REQUEST_LINES = [
        "srv  log_server_r: request: POST /v1/chat/completions 127.0.0.1 200",
        "srv  params_from_: Chat format: Content-only",
        "slot launch_slot_: id  0 | task 0 | processing task",
        "slot update_slots: id  0 | task 0 | new prompt, n_ctx_slot = 4096, n_keep = 0",
        "slot      release: id  0 | task 0 | stop processing: n_past = 17, truncated = 0",
        "prompt eval time =       5.01 ms /    10 tokens (    0.50 ms per token)",
        "       eval time =      20.30 ms /     8 tokens (    2.54 ms per token)",
        "      total time =      25.31 ms /    18 tokens",
        "srv  update_slots: all slots are idle",
        "que    start_loop: processing new tasks",
        # b11434 prefixes its lines with its uptime and a level letter
        "0.00.533.018 I slot get_availabl: id  0 | task -1 | selected slot by LRU, t_last = -1",
        "0.00.533.955 I slot print_timing: id  0 | task 1 | prompt eval time =       0.62 ms",
        "0.00.533.967 I slot      release: id  0 | task 1 | stop processing: n_tokens = 19",
    ]
    OTHER_LINES = [
        "main: server is listening on http://127.0.0.1:8080 - starting the main loop",
        "srv    load_model: loading model '/models/tiny.gguf'",
        "llama_model_load: error loading model: tensor 'x' not found",
        "build: 11434 (abc) with cc for x86_64-linux-gnu",
        "0.00.079.692 I srv  llama_server: listening on http://127.0.0.1:37569",
        "0.00.061.421 I srv    load_model: loading model '/tmp/tiny.gguf'",
    ]

    def levels(self) -> dict[str, LogLevel]:
        return {e["line"]: e["log_level"] for e in self.events
                if e["log_namespace"] == CHILD_LOG_NAMESPACE}

    def test_request_lines_at_debug_the_rest_at_info(self) -> None:
        self.supervisor.startService()
        for line in self.REQUEST_LINES + self.OTHER_LINES:
            self.process.write_stderr(line.encode() + b"\n")
        levels = self.levels()
        self.assertEqual({levels[line] for line in self.REQUEST_LINES}, {LogLevel.debug})
        self.assertEqual({levels[line] for line in self.OTHER_LINES}, {LogLevel.info})

    def test_level_configurable(self) -> None:
        self.supervisor.request_log_level = LogLevel.info
        self.supervisor.startService()
        self.process.write_stderr(self.REQUEST_LINES[0].encode() + b"\n")
        self.assertEqual(self.levels()[self.REQUEST_LINES[0]], LogLevel.info)


class LineSplitterTests(SynchronousTestCase):
    """LineSplitter: partial lines, invalid UTF-8, the length cap."""

    def test_partial(self) -> None:
        splitter = LineSplitter()
        self.assertEqual(splitter.feed(b"a\nb"), ["a"])
        self.assertEqual(splitter.feed(b"c\n\nd"), ["bc", ""])
        self.assertEqual(splitter.flush(), ["d"])
        self.assertEqual(splitter.flush(), [])

    def test_invalid_utf8(self) -> None:
        self.assertEqual(LineSplitter().feed(b"caf\xe9\n"), ["caf\ufffd"])

    def test_long_line_in_one_chunk(self) -> None:
        splitter = LineSplitter(max_line=10)
        self.assertEqual(splitter.feed(b"x" * 25 + b"\nok\n"), ["x" * 10 + " [truncated]", "ok"])

    def test_long_line_across_chunks(self) -> None:
        splitter = LineSplitter(max_line=10)
        self.assertEqual(splitter.feed(b"y" * 8), [])
        self.assertEqual(splitter.feed(b"y" * 8), ["y" * 10 + " [truncated]"])
        self.assertEqual(splitter.feed(b"y" * 100), [])  # the rest of that line is dropped
        self.assertEqual(splitter.feed(b"yy\nnext\n"), ["next"])
        self.assertEqual(splitter.flush(), [])


class TimingsTests(SynchronousTestCase):
    """SupervisorTimings.from_config."""

    def test_from_config(self) -> None:
        config = make_config(
            ready_timeout=120.0,
            stop_timeout=7.0,
            backoff_max=30.0,
            backoff_reset=90.0,
            probe_interval=3.0,
            health_timeout=1.5,
        )
        self.assertEqual(
            SupervisorTimings.from_config(config),
            SupervisorTimings(
                ready_timeout=120.0,
                stop_timeout=7.0,
                backoff_max=30.0,
                backoff_reset=90.0,
                probe_interval=3.0,
                health_timeout=1.5,
            ),
        )


class OperatorRestartTests(SupervisorTestCase):
    """``restart()``: the operator page's button. TERM, then a new child at once, no crash."""

    def test_restart_ready_child(self) -> None:
        self.start_ready()
        first = self.process
        self.assertTrue(self.supervisor.restart())
        self.assertIs(self.backend.state, BackendState.STARTING)
        self.assertEqual(first.signals, ["TERM"])
        self.assertEqual(len(self.reactor.spawned), 1)  # not before the old one has ended
        first.exit(0)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertIsNot(self.process, first)
        self.assertIs(self.backend.state, BackendState.STARTING)
        self.assertEqual(self.backend.restarts, 0)  # not a crash
        self.assertIsNone(self.backend.last_exit)
        self.reactor.advance(TIMINGS.startup_probe_interval)
        self.assertIs(self.backend.state, BackendState.READY)
        self.assertIn("Restarting llama-server (pid 4242) at an operator's request",
                      self.messages())

    def test_restart_kills_a_child_ignoring_term(self) -> None:
        self.start_ready()
        first = self.process
        self.supervisor.restart()
        self.reactor.advance(TIMINGS.stop_timeout)
        self.assertEqual(first.signals, ["TERM", "KILL"])
        first.kill_by_signal(9)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(self.backend.restarts, 0)

    def test_restart_twice_sends_one_term(self) -> None:
        self.start_ready()
        self.supervisor.restart()
        self.supervisor.restart()
        self.assertEqual(self.process.signals, ["TERM"])

    def test_restart_during_backoff_starts_now(self) -> None:
        self.supervisor.startService()
        self.process.exit(1)
        self.assertIs(self.backend.state, BackendState.BACKOFF)
        self.assertTrue(self.supervisor.restart())
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertIs(self.backend.state, BackendState.STARTING)
        self.reactor.advance(TIMINGS.backoff_max)  # the backoff timer was cancelled
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_no_restart_when_stopped_or_stopping(self) -> None:
        self.assertFalse(self.supervisor.restart())
        self.start_ready()
        d = self.supervisor.stopService()
        self.assertFalse(self.supervisor.restart())
        self.process.exit(0)
        self.successResultOf(d)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.assertIs(self.backend.state, BackendState.STOPPED)

    def test_stop_during_restart_wins(self) -> None:
        self.start_ready()
        self.supervisor.restart()
        d = self.supervisor.stopService()
        self.process.exit(0)
        self.successResultOf(d)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.assertIs(self.backend.state, BackendState.STOPPED)
class SendFailureTests(SupervisorTestCase):
    """A request that could not reach the child (issue 24.1): down at once, probed now."""

    def test_refused_send_marks_down_probes_now_and_requests_wait(self) -> None:
        self.start_ready()
        probes = len(self.agent.requests)
        self.health = "hang"  # the immediate probe stays in flight
        self.backend.send_failed("connection refused")
        self.assertFalse(self.backend.ready)
        self.assertTrue(self.backend.recovering)  # a local child is expected back: hold
        self.assertEqual(self.backend.last_probe.detail, "connection refused")  # type: ignore[union-attr]
        self.assertEqual(len(self.agent.requests), probes + 1)  # no wait for the schedule
        self.agent.requests[-1].respond(200, b'{"status":"ok"}')  # began after: it counts
        self.assertTrue(self.backend.ready)

    def test_ignored_once_stopped(self) -> None:
        self.start_ready()
        self.supervisor.stopService()
        probes = len(self.agent.requests)
        self.backend.send_failed("connection refused")
        self.assertEqual(len(self.agent.requests), probes)
