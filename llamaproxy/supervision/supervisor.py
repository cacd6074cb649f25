"""Supervision of one local llama-server child: spawn, probe until ready, restart, stop.

Modelled on Twisted's ``runner/procmon.py`` (TERM then KILL, output lines as log events, the fake
process reactor in its tests) and ``application/_client_service.py`` (one explicit state machine,
an injected clock, ``backoffPolicy``, stop waiters), without subclassing either (see
reference/twisted-notes.md §1.5 for why). The states are ``BackendState`` on the shared
``Backend`` record::

    STOPPED --start--> STARTING --503--> LOADING --200--> READY
    STARTING/LOADING/READY --process ended--> BACKOFF --delay--> STARTING
    STARTING/LOADING --ready_timeout--> (TERM, KILL) --> BACKOFF
    any --stopService--> STOPPING --process ended--> STOPPED    (BACKOFF --stopService--> STOPPED)

Over 500 lines because the child's state machine (above) is one object: each transition's timers
and signals live with it.
"""

from __future__ import annotations

import contextlib
import random
import re
import shlex
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from llamaproxy.backends.backend import Backend, BackendState, ProbeResult
from llamaproxy.config import Config
from llamaproxy.supervision.llama_server import BackendKeyFile, error_line, format_exit
from llamaproxy.supervision.probe import DelayedCall, HTTPAgent, ProbeLoop, TimeSource, probe_health

log = Logger()

#: llama-server's own output is logged under this namespace, one event per line.
CHILD_LOG_NAMESPACE = "llamaproxy.supervision.llama_server"

#: Longest child output line logged; the rest of a longer line is dropped.
MAX_LINE_BYTES = 4096

#: llama-server's lines about one request (its access line, slot work, timings, the task queue):
#: logged at ``CHILD_REQUEST_LOG_LEVEL`` (debug by default), the rest at info.
#: Lines may start with llama.cpp's log prefix: uptime and a level letter ("0.00.533.018 I ").
_REQUEST_LINE = re.compile(
    r"(\d+\.\d+\.\d+\.\d+ [A-Z] )?"
    r"(slot |que |srv +(log_server_r|params_from_|update_slots|cancel_tasks|operator\(\))"
    r"|\s*(prompt eval time|eval time|total time) *=|request: )"
)


def is_request_line(line: str) -> bool:
    """True for llama-server's per-request output (not startup, warnings or errors)."""
    return _REQUEST_LINE.match(line) is not None


class ProcessReactor(TimeSource, Protocol):
    """What the supervisor needs from its reactor: ``IReactorProcess`` + ``IReactorTime``."""

    def spawnProcess(
        self,
        processProtocol: ProcessProtocol,  # noqa: N803 - Twisted's name
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
    ) -> Any:
        """Start a child; returns its ``IProcessTransport``."""
        ...


class ChildProcess(Protocol):
    """The part of ``IProcessTransport`` the supervisor uses."""

    pid: int | None

    def signalProcess(self, signalID: str | int) -> None:  # noqa: N803
        """Send a signal ("TERM", "KILL" or a number); ``ProcessExitedAlready`` if gone."""
        ...


@dataclass(frozen=True)
class SupervisorTimings:
    """Every duration the supervisor uses, in seconds."""

    ready_timeout: float = 600.0
    stop_timeout: float = 30.0
    backoff_max: float = 60.0
    backoff_reset: float = 60.0
    probe_interval: float = 5.0
    health_timeout: float = 2.0
    #: Probe interval while the child is starting or loading (and after a failed probe).
    startup_probe_interval: float = 0.5
    #: How far ahead ``backend.retry_at`` is put while the child starts or loads.
    not_ready_retry_after: float = 5.0

    @classmethod
    def from_config(cls, config: Config) -> SupervisorTimings:
        """The timings of ``config``; the two startup values keep their defaults."""
        return cls(
            ready_timeout=config.ready_timeout,
            stop_timeout=config.stop_timeout,
            backoff_max=config.backoff_max,
            backoff_reset=config.backoff_reset,
            probe_interval=config.probe_interval,
            health_timeout=config.health_timeout,
        )


class LineSplitter:
    """Splits a byte stream into text lines, across chunks, with a cap on a line's length."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[str]:
        """Add ``data``; return the lines it completed (an over-long line once, truncated)."""
        self._buffer += data
        lines: list[str] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            raw = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._discarding:
                self._discarding = False
                continue
            lines.append(self._decode(raw))
        if len(self._buffer) > self.max_line:
            if not self._discarding:
                lines.append(self._decode(bytes(self._buffer)))
                self._discarding = True
            self._buffer.clear()
        return lines

    def flush(self) -> list[str]:
        """The unterminated last line, if any (at end of stream)."""
        raw, self._buffer = bytes(self._buffer), bytearray()
        discarding, self._discarding = self._discarding, False
        if not raw or discarding:
            return []
        return [self._decode(raw)]

    def _decode(self, raw: bytes) -> str:
        text = raw[: self.max_line].decode("utf-8", errors="replace").rstrip("\r")
        if len(raw) > self.max_line:
            text += " [truncated]"
        return text


class LlamaServerProcessProtocol(ProcessProtocol):
    """Logs llama-server's stdout/stderr line by line and reports the end of the process."""

    def __init__(
        self,
        on_ended: Callable[[LlamaServerProcessProtocol, int | None, int | None], None],
        child_log: Logger,
        max_line: int = MAX_LINE_BYTES,
        request_level: LogLevel = LogLevel.debug,
    ) -> None:
        self._on_ended = on_ended
        self._log = child_log
        self._request_level = request_level
        self._splitters = {"stdout": LineSplitter(max_line), "stderr": LineSplitter(max_line)}
        self.pid: int | None = None
        #: The first error line the child printed since it started (or since it was ready):
        #: why it ended, in its own words, for the logs and /health.
        self.first_error: str | None = None

    def connectionMade(self) -> None:
        self.pid = cast(Any, self.transport).pid

    def outReceived(self, data: bytes) -> None:
        self._emit("stdout", self._splitters["stdout"].feed(data))

    def errReceived(self, data: bytes) -> None:
        self._emit("stderr", self._splitters["stderr"].feed(data))

    def processEnded(self, reason: Failure) -> None:
        for stream, splitter in self._splitters.items():
            self._emit(stream, splitter.flush())
        exit_code: int | None = getattr(reason.value, "exitCode", None)
        signal: int | None = getattr(reason.value, "signal", None)
        self._on_ended(self, exit_code, signal)

    def _emit(self, stream: str, lines: list[str]) -> None:
        for line in lines:
            if self.first_error is None:
                self.first_error = error_line(line)
            level = self._request_level if is_request_line(line) else LogLevel.info
            self._log.emit(level, "{line}", line=line, stream=stream, pid=self.pid)


class LlamaServerSupervisor(Service):
    """Runs one llama-server child and keeps its ``Backend`` record true.

    ``startService`` writes the key file (if it is not written yet) and spawns the child;
    ``stopService`` returns a Deferred that fires only once the child has been reaped (TERM, then
    KILL after ``stop_timeout``) and the key file is deleted. After ``stopService`` began nothing
    is restarted.
    """

    def __init__(
        self,
        backend: Backend,
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str],
        key_file: BackendKeyFile | None,
        reactor: ProcessReactor,
        agent: HTTPAgent,
        timings: SupervisorTimings | None = None,
        jitter: Callable[[], float] = random.random,
        launcher: Callable[[str, list[str]], tuple[str, list[str]]] | None = None,
        request_log_level: LogLevel = LogLevel.debug,
    ) -> None:
        self.backend = backend
        #: The level of the child's per-request output lines (CHILD_REQUEST_LOG_LEVEL).
        self.request_log_level = request_log_level
        self.executable = executable
        #: Turns (executable, argv) into what is spawned; e.g. llama_server.spawn_command.
        self.launcher = launcher
        self.args = list(args)
        self.env = dict(env)
        self.key_file = key_file
        self._reactor = reactor
        self._agent = agent
        self.timings = timings if timings is not None else SupervisorTimings()
        self._backoff = backoffPolicy(
            initialDelay=1.0, maxDelay=self.timings.backoff_max, factor=2.0, jitter=jitter
        )
        self._child_log = Logger(namespace=CHILD_LOG_NAMESPACE, source=self)
        self._attempt = 0
        self._stopping = False
        self._stop_waiters: list[Deferred[None]] = []
        self._protocol: LlamaServerProcessProtocol | None = None
        self._process: ChildProcess | None = None
        self._probe_loop: ProbeLoop | None = None
        self._restart_call: DelayedCall | None = None
        self._ready_timeout_call: DelayedCall | None = None
        self._kill_call: DelayedCall | None = None
        self._kill_reason: str | None = None
        self._started_at: float | None = None
        self._ready_at: float | None = None
        self._operator_restart = False

    # --- public state --------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The child's pid while one is running."""
        return self._process.pid if self._process is not None else None

    @property
    def restart_count(self) -> int:
        """How many times the child ended unexpectedly (each followed by a restart)."""
        return self.backend.restarts

    @property
    def ready_since(self) -> float | None:
        """Clock time at which the current child became ready, or None."""
        return self._ready_at

    @property
    def command_line(self) -> str:
        """The child's command line, for logs (holds the key file's path, never the key)."""
        return shlex.join([self.executable, *self.args])

    # --- Service -------------------------------------------------------------------------------

    def startService(self) -> None:
        """Write the key file if needed and start the child."""
        if self.key_file is not None and not self.key_file.written:
            self.key_file.write()
        Service.startService(self)
        self._stopping = False
        self._attempt = 0
        if self._process is None:
            self._spawn()

    def stopService(self) -> Deferred[None]:
        """Stop the child (TERM, then KILL); the Deferred fires once it has been reaped."""
        Service.stopService(self)
        self._stopping = True
        self._cancel_timers(kill_too=False)  # a pending SIGKILL escalation stays armed
        self._stop_probing()
        if self._process is None:
            self._finish_stop()
            done: Deferred[None] = Deferred()
            done.callback(None)
            return done
        waiter: Deferred[None] = Deferred()
        self._stop_waiters.append(waiter)
        if self.backend.state is not BackendState.STOPPING:
            self.backend.set_state(BackendState.STOPPING)
            log.info(
                "Stopping llama-server (pid {pid}): SIGTERM, SIGKILL after {stop_timeout:g} s",
                pid=self.pid,
                stop_timeout=self.timings.stop_timeout,
                backend=self.backend.name,
            )
            self._terminate()
        return waiter

    def restart(self) -> bool:
        """Restart the child now, at an operator's request (the operator page's button).

        The running child gets SIGTERM (SIGKILL after ``stop_timeout``) and a new one is spawned
        as soon as it has ended, without the crash backoff and without counting a crash; a child
        waiting in backoff is started at once. Meanwhile the backend says STARTING, so requests
        wait for it. Returns False (and does nothing) while the service is stopped or stopping.
        """
        if self._stopping or not self.running:
            return False
        log.info(
            "Restarting llama-server (pid {pid}) at an operator's request",
            pid=self.pid, backend=self.backend.name,
        )
        if self._process is None:
            self._cancel_timers()
            self._attempt = 0
            self._spawn()
            return True
        self._operator_restart = True
        self._stop_probing()
        if self._ready_timeout_call is not None and self._ready_timeout_call.active():
            self._ready_timeout_call.cancel()
        self._ready_timeout_call = None
        self._ready_at = None
        self.backend.set_state(
            BackendState.STARTING,
            retry_at=self._reactor.seconds() + self.timings.not_ready_retry_after,
        )
        self._terminate()
        return True

    # --- the child -----------------------------------------------------------------------------

    def _spawn(self) -> None:
        if self.key_file is not None and self.key_file.written and not self.key_file.exists():
            # Removed behind our back (e.g. /dev/shm cleaned at logout): the child would fail.
            log.warn("Backend key file {path} disappeared; writing it again",
                     path=self.key_file.path)
            try:
                self.key_file.write()
            except OSError as e:
                log.error("Could not write the backend key file again: {error}", error=str(e))
        now = self._reactor.seconds()
        protocol = LlamaServerProcessProtocol(
            self._process_ended, self._child_log, request_level=self.request_log_level)
        argv = [self.executable, *self.args]
        log.info(
            "Starting llama-server: {command}",
            command=self.command_line,
            backend=self.backend.name,
            attempt=self._attempt,
        )
        self.backend.last_probe = None
        self._ready_at = None
        self._started_at = now
        self._kill_reason = None
        self._operator_restart = False
        try:
            program = self.executable
            if self.launcher is not None:
                program, argv = self.launcher(self.executable, argv)
            transport = self._reactor.spawnProcess(protocol, program, argv, env=self.env)
        except Exception as e:  # a failed spawn is handled like a crash
            log.failure("Could not start llama-server", backend=self.backend.name)
            self._crashed(f"could not start: {e}")
            return
        self._protocol = protocol
        self._process = cast(ChildProcess, transport)
        log.info("llama-server started with pid {pid}", pid=self.pid, backend=self.backend.name)
        self.backend.set_state(
            BackendState.STARTING, retry_at=now + self.timings.not_ready_retry_after
        )
        self._ready_timeout_call = self._reactor.callLater(
            self.timings.ready_timeout, self._ready_timed_out
        )
        loop = ProbeLoop(self._probe, self._on_probe, self._probe_interval, self._reactor)
        self._probe_loop = loop
        self.backend.on_send_failure = self._send_failed
        loop.start(now=False)

    def _process_ended(
        self, protocol: LlamaServerProcessProtocol, exit_code: int | None, signal: int | None
    ) -> None:
        if protocol is not self._protocol:
            return  # an older child, already accounted for
        pid = protocol.pid
        self._protocol = None
        self._process = None
        self._cancel_timers()
        self._stop_probing()
        if self._stopping:
            log.info(
                "llama-server (pid {pid}) stopped ({exit})",
                pid=pid,
                exit=f"signal {signal}" if signal is not None else f"exit code {exit_code}",
                exit_code=exit_code,
                signal=signal,
                backend=self.backend.name,
            )
            self._finish_stop()
            return
        if self._operator_restart:
            log.info(
                "llama-server (pid {pid}) ended for the operator's restart; starting a new one",
                pid=pid, backend=self.backend.name,
            )
            self._attempt = 0
            self._spawn()
            return
        description = format_exit(exit_code, signal, protocol.first_error)
        if self._kill_reason is not None:
            description = f"{self._kill_reason}; {description}"
        self._crashed(description, pid=pid, exit_code=exit_code, signal=signal)

    def _crashed(
        self,
        description: str,
        pid: int | None = None,
        exit_code: int | None = None,
        signal: int | None = None,
    ) -> None:
        now = self._reactor.seconds()
        if self._ready_at is not None and now - self._ready_at >= self.timings.backoff_reset:
            self._attempt = 0
        delay = self._backoff(self._attempt)
        self._attempt += 1
        self._ready_at = None
        self._kill_reason = None
        self.backend.restarts += 1
        self.backend.last_exit = description
        uptime = now - self._started_at if self._started_at is not None else 0.0
        log.error(
            "llama-server (pid {pid}) ended unexpectedly after {uptime:.1f} s: {exit}; "
            "restarting in {delay:.1f} s (restart {restarts})",
            pid=pid,
            exit=description,
            exit_code=exit_code,
            signal=signal,
            uptime=uptime,
            delay=delay,
            restarts=self.backend.restarts,
            backend=self.backend.name,
        )
        self.backend.set_state(BackendState.BACKOFF, retry_at=now + delay)
        self._restart_call = self._reactor.callLater(delay, self._restart)

    def _restart(self) -> None:
        self._restart_call = None
        if self._stopping or not self.running or self._process is not None:
            return
        self._spawn()

    def _ready_timed_out(self) -> None:
        self._ready_timeout_call = None
        if self._process is None or self._stopping:
            return
        timeout = self.timings.ready_timeout
        log.error(
            "llama-server (pid {pid}) was not ready within {timeout:g} s; killing it",
            pid=self.pid,
            timeout=timeout,
            backend=self.backend.name,
        )
        self._kill_reason = f"not ready within {timeout:g} s"
        self._stop_probing()
        self._terminate()

    def _terminate(self) -> None:
        """SIGTERM now, SIGKILL after ``stop_timeout`` unless the child has ended by then."""
        if self._process is None or self._kill_call is not None:
            return
        try:
            self._process.signalProcess("TERM")
        except ProcessExitedAlready:
            return  # processEnded is on its way
        self._kill_call = self._reactor.callLater(self.timings.stop_timeout, self._kill)

    def _kill(self) -> None:
        self._kill_call = None
        if self._process is None:
            return
        log.emit(
            LogLevel.warn,
            "llama-server (pid {pid}) still running {stop_timeout:g} s after SIGTERM; "
            "sending SIGKILL",
            pid=self.pid,
            stop_timeout=self.timings.stop_timeout,
            backend=self.backend.name,
        )
        with contextlib.suppress(ProcessExitedAlready):
            self._process.signalProcess("KILL")

    def _finish_stop(self) -> None:
        if self.backend.state is not BackendState.STOPPED:
            self.backend.set_state(BackendState.STOPPED)
        if self.key_file is not None:
            try:
                self.key_file.delete()
            except OSError:
                log.failure("Could not delete the backend key file {path}", path=self.key_file.path)
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _cancel_timers(self, kill_too: bool = True) -> None:
        names = ["_restart_call", "_ready_timeout_call"] + (["_kill_call"] if kill_too else [])
        for name in names:
            call: DelayedCall | None = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)

    # --- probing -------------------------------------------------------------------------------

    def _stop_probing(self) -> None:
        loop, self._probe_loop = self._probe_loop, None
        if loop is not None:
            loop.stop()

    def _send_failed(self, detail: str) -> None:
        """A request could not reach the child: count it as a failed probe, and probe now.

        The child is expected back (it is restarted if it died), so requests wait for it.
        """
        if self._process is None or self._stopping or self._probe_loop is None:
            return
        self._on_probe(ProbeResult(self._reactor.seconds(), "down", detail))
        self._probe_loop.probe_now()

    def _probe(self) -> Coroutine[Any, Any, ProbeResult]:
        return probe_health(
            self._agent, self.backend.base_url, self._reactor, self.timings.health_timeout
        )

    def _probe_interval(self) -> float:
        if self.backend.ready:
            return self.timings.probe_interval
        return self.timings.startup_probe_interval

    def _on_probe(self, result: ProbeResult) -> None:
        if self._process is None or self._stopping:
            return
        previous = self.backend.last_probe
        self.backend.last_probe = result
        state = self.backend.state
        if state is BackendState.READY:
            self._on_ready_probe(previous, result)
            return
        if result.outcome == "ready":
            now = self._reactor.seconds()
            self._ready_at = now
            if self._ready_timeout_call is not None and self._ready_timeout_call.active():
                self._ready_timeout_call.cancel()
            self._ready_timeout_call = None
            started = self._started_at if self._started_at is not None else now
            if self._protocol is not None:
                self._protocol.first_error = None  # a later end gets its own reason
            self.backend.set_state(BackendState.READY)
            log.info(
                "llama-server ready after {seconds:.1f} s (pid {pid})",
                seconds=now - started,
                pid=self.pid,
                backend=self.backend.name,
            )
            return
        retry_at = result.at + self.timings.not_ready_retry_after
        if result.outcome == "loading":
            if state is not BackendState.LOADING:
                log.info(
                    "llama-server is loading the model (pid {pid})",
                    pid=self.pid,
                    backend=self.backend.name,
                )
            self.backend.set_state(BackendState.LOADING, retry_at=retry_at)
        else:
            self.backend.set_state(state, retry_at=retry_at)  # not answering yet: keep waiting

    def _on_ready_probe(self, previous: ProbeResult | None, result: ProbeResult) -> None:
        was_ok = previous is None or previous.outcome == "ready"
        if result.outcome == "ready":
            if not was_ok:
                log.info(
                    "llama-server (pid {pid}) answers its health probe again",
                    pid=self.pid,
                    backend=self.backend.name,
                )
            return
        if was_ok:
            log.emit(
                LogLevel.warn,
                "llama-server (pid {pid}) failed its health probe: {outcome} ({detail})",
                pid=self.pid,
                outcome=result.outcome,
                detail=result.detail,
                backend=self.backend.name,
            )
