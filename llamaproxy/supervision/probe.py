"""Readiness probing of llama-server: one GET /health, a probe loop, and the external monitor.

llama-server refuses connections until its socket is bound, answers ``/health`` with 503
``{"error": {"message": "Loading model", …}}`` while the model loads, and 200 once it can serve.
``/health`` never needs the API key. ``probe_health`` turns one such request into a
``ProbeResult`` and never raises; ``ProbeLoop`` repeats it without overlap and survives errors;
``ExternalBackendMonitor`` maps the results onto a ``Backend`` when there is no child process
(``BACKEND_URL`` mode).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, cast

from twisted.application.service import Service
from twisted.internet import error as internet_error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

from llamaproxy.backends.backend import Backend, BackendState, ProbeResult

log = Logger()

#: The most of a /health body we read; llama-server's are a few dozen bytes.
PROBE_BODY_LIMIT = 4096

_USER_AGENT = b"llamaproxy-probe"


class TimeSource(Protocol):
    """The part of ``IReactorTime`` we use (a reactor or a ``task.Clock``)."""

    def seconds(self) -> float:
        """The current time in seconds."""
        ...

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> Any:
        """Call ``callable`` after ``delay`` seconds; returns an ``IDelayedCall``."""
        ...


class HTTPAgent(Protocol):
    """``IAgent`` as a structural type (``BackendClient``, Twisted's ``Agent``, ``AgentSpy``)."""

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,  # noqa: N803 - Twisted's name
    ) -> Deferred[IResponse]:
        """Issue a request; the Deferred fires with the response (headers received)."""
        ...


class DelayedCall(Protocol):
    """The part of ``IDelayedCall`` we use."""

    def active(self) -> bool:
        """True until the call ran or was cancelled."""
        ...

    def cancel(self) -> None:
        """Prevent the call from running."""
        ...


class _BodySource(Protocol):
    def deliverBody(self, protocol: TwistedProtocol) -> None: ...


class _BoundedBodyReader(TwistedProtocol):
    """Collects at most ``limit`` bytes of a response body, then stops the transfer."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.finished: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[bytes]) -> None:
        self._stop_transfer()

    def _stop_transfer(self) -> None:
        if self.transport is not None:
            cast(Any, self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size >= self._limit:
            self.finished.callback(b"".join(self._chunks)[: self._limit])
            self._stop_transfer()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)


def read_body_bounded(response: IResponse, limit: int = PROBE_BODY_LIMIT) -> Deferred[bytes]:
    """Read at most ``limit`` bytes of ``response``'s body (cancellable, like ``readBody``)."""
    reader = _BoundedBodyReader(limit)
    cast(_BodySource, response).deliverBody(reader)
    return reader.finished


async def _fetch_health(agent: HTTPAgent, url: bytes) -> tuple[int, bytes]:
    response = await agent.request(b"GET", url, Headers({b"User-Agent": [_USER_AGENT]}))
    code = int(cast(Any, response).code)
    try:
        body = await read_body_bounded(response)
    except CancelledError:
        raise
    except Exception:  # the status line is what matters
        body = b""
    return code, body


def _error_message(body: bytes) -> str:
    """llama-server's ``error.message`` from a JSON body, or ''."""
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])[:200]
    return ""


def _describe_failure(exc: BaseException, timeout: float) -> str:
    """A short reason for a failed probe, for logs and /health."""
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, CancelledError):
        return "cancelled"
    if isinstance(exc, internet_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, internet_error.DNSLookupError):
        return "DNS lookup failed"
    if isinstance(exc, internet_error.TimeoutError):
        return "connect timed out"
    if isinstance(exc, ResponseNeverReceived | ResponseFailed):
        reasons = getattr(exc, "reasons", [])
        for reason in reasons:
            if isinstance(reason, Failure) and reason.check(internet_error.ConnectionRefusedError):
                return "connection refused"
        return "connection closed without a response"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:200]


async def probe_health(
    agent: HTTPAgent, base_url: str, clock: TimeSource, timeout: float
) -> ProbeResult:
    """GET ``base_url``/health once: 200 → ready, 503 → loading, anything else → down.

    Never raises: connection errors and the timeout become a "down" result with a short detail.
    """
    url = (base_url.rstrip("/") + "/health").encode("ascii")
    attempt: Deferred[tuple[int, bytes]] = Deferred.fromCoroutine(_fetch_health(agent, url))
    attempt.addTimeout(timeout, cast(IReactorTime, clock))
    try:
        code, body = await attempt
    except Exception as e:  # a probe reports failures, it never raises
        return ProbeResult(at=clock.seconds(), outcome="down", detail=_describe_failure(e, timeout))
    if code == 200:
        return ProbeResult(at=clock.seconds(), outcome="ready", status_code=code)
    if code == 503:
        detail = _error_message(body) or "HTTP 503"
        return ProbeResult(at=clock.seconds(), outcome="loading", detail=detail, status_code=code)
    detail = f"HTTP {code}"
    message = _error_message(body)
    if message:
        detail = f"{detail}: {message}"
    return ProbeResult(at=clock.seconds(), outcome="down", detail=detail, status_code=code)


class ProbeLoop:
    """Runs a probe again and again, never two at once, ``interval()`` seconds apart.

    ``interval`` is asked after every probe, so the owner can probe fast while a backend loads
    and slowly once it is ready. Exceptions from the probe or from ``on_result`` are logged and
    the loop goes on (unlike a ``LoopingCall``, which would die silently). ``stop()`` cancels the
    pending timer and any probe in flight; no result is delivered after it. ``probe_now()``
    probes at once (a request just failed to reach the backend): a probe already in flight
    began before that failure, so its result is dropped and a fresh probe follows it.
    """

    def __init__(
        self,
        probe: Callable[[], Coroutine[Any, Any, ProbeResult]],
        on_result: Callable[[ProbeResult], None],
        interval: Callable[[], float],
        clock: TimeSource,
    ) -> None:
        self._probe = probe
        self._on_result = on_result
        self._interval = interval
        self._clock = clock
        self._call: DelayedCall | None = None
        self._in_flight: Deferred[None] | None = None
        #: Bumped by ``probe_now``: results of probes begun under an older value are dropped.
        self._generation = 0
        self._again = False
        self.running = False
        self.probes = 0

    def start(self, now: bool = True) -> None:
        """Begin probing: at once, or after the first interval."""
        if self.running:
            return
        self.running = True
        if now:
            self._tick()
        else:
            self._schedule()

    def stop(self) -> None:
        """Stop probing; cancel the timer and the probe in flight."""
        self.running = False
        self._again = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.cancel()

    def probe_now(self) -> None:
        """Probe at once, whatever the schedule; results of probes begun before are dropped."""
        if not self.running:
            return
        self._generation += 1
        if self._in_flight is not None:
            self._again = True  # after the stale probe in flight ends
            return
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._tick()

    def _schedule(self) -> None:
        if not self.running:
            return
        if self._again:
            self._again = False
            delay = 0.0
        else:
            try:
                delay = max(0.0, float(self._interval()))
            except Exception:  # the loop must survive
                log.failure("Probe interval could not be computed; using 1 s")
                delay = 1.0
        self._call = self._clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._call = None
        if not self.running:
            return
        self.probes += 1
        attempt = Deferred.fromCoroutine(self._probe_once())
        attempt.addErrback(self._probe_failed)
        attempt.addBoth(self._probe_done)
        if not attempt.called:
            self._in_flight = attempt

    async def _probe_once(self) -> None:
        generation = self._generation
        result = await self._probe()
        if self.running and generation == self._generation:
            self._on_result(result)

    def _probe_failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) and not self.running:
            return
        log.failure("Health probe or its handler failed; probing continues", failure)

    def _probe_done(self, _: object) -> None:
        self._in_flight = None
        self._schedule()


class ExternalBackendMonitor(Service):
    """Keeps a ``Backend`` for an already running llama-server (``BACKEND_URL``) up to date.

    Probes at once, then every ``not_ready_interval`` seconds until ready and every
    ``probe_interval`` seconds after that. loading → LOADING, ready → READY, down (refused,
    reset, timed out, an HTTP error) → UNREACHABLE: an external server is not expected back by
    itself, so requests fail fast (502) instead of waiting QUEUE_TIMEOUT for it. A request that
    cannot reach it (``Backend.send_failed``) makes it UNREACHABLE at once and probes it now.
    """

    def __init__(
        self,
        backend: Backend,
        agent: HTTPAgent,
        clock: TimeSource,
        probe_interval: float,
        health_timeout: float,
        not_ready_interval: float = 1.0,
        retry_after: float = 5.0,
        no_health_is_ready: bool = False,
    ) -> None:
        self.backend = backend
        #: Count a 404 on /health as ready: upstreams without a health endpoint (hosted APIs)
        #: answer HTTP, and their failures are left to the circuit breaker.
        self.no_health_is_ready = no_health_is_ready
        self._agent = agent
        self._clock = clock
        self._probe_interval = probe_interval
        self._health_timeout = health_timeout
        self._not_ready_interval = not_ready_interval
        self._retry_after = retry_after
        self._loop = ProbeLoop(self._probe, self._on_result, self._interval, clock)

    def startService(self) -> None:
        """Mark the backend STARTING and begin probing at once."""
        Service.startService(self)
        self.backend.set_state(
            BackendState.STARTING, retry_at=self._clock.seconds() + self._retry_after
        )
        log.info(
            "Monitoring external backend {backend} at {url}",
            backend=self.backend.name,
            url=self.backend.base_url,
        )
        self.backend.on_send_failure = self._send_failed
        self._loop.start(now=True)

    def stopService(self) -> Deferred[None]:
        """Stop probing and mark the backend STOPPED."""
        Service.stopService(self)
        self.backend.on_send_failure = None
        self._loop.stop()
        self.backend.set_state(BackendState.STOPPED)
        done: Deferred[None] = Deferred()
        done.callback(None)
        return done

    def _interval(self) -> float:
        if self.backend.ready:
            return self._probe_interval
        return self._not_ready_interval

    def _probe(self) -> Coroutine[Any, Any, ProbeResult]:
        return probe_health(self._agent, self.backend.base_url, self._clock, self._health_timeout)

    def _send_failed(self, detail: str) -> None:
        """A request could not reach the backend: unreachable now, and probe it at once."""
        if not self.running:
            return
        self._on_result(ProbeResult(self._clock.seconds(), "down", detail))
        self._loop.probe_now()

    def _on_result(self, result: ProbeResult) -> None:
        if self.no_health_is_ready and result.outcome == "down" and result.status_code == 404:
            result = ProbeResult(result.at, "ready", "no /health endpoint", 404)
        previous = self.backend.last_probe
        self.backend.last_probe = result
        changed = previous is None or previous.outcome != result.outcome
        if result.outcome == "ready":
            self.backend.set_state(BackendState.READY)
            if changed:
                log.info("External backend {backend} is ready", backend=self.backend.name)
            return
        if result.outcome == "loading":
            self.backend.set_state(BackendState.LOADING, retry_at=result.at + self._retry_after)
        else:
            # Probed again every not_ready_interval: clients may retry after about that long.
            self.backend.set_state(
                BackendState.UNREACHABLE, retry_at=result.at + self._not_ready_interval
            )
        if changed:
            log.emit(
                LogLevel.warn,
                "External backend {backend} is not ready: {outcome} ({detail})",
                backend=self.backend.name,
                outcome=result.outcome,
                detail=result.detail,
            )
