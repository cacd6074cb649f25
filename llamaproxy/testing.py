"""Public, tested fakes for testing llamaproxy (and code built on it) without processes or sockets.

- ``FakeProcessReactor`` / ``FakeProcessTransport``: a ``MemoryReactorClock`` whose
  ``spawnProcess`` records the call and returns a process the test makes talk and exit
  (the pattern of Twisted's ``runner/test/test_procmon.py``).
- ``AgentSpy`` / ``RequestRecord`` / ``StubResponse``: an ``IAgent`` that records requests and
  returns Deferreds the test fires (like treq's private ``_agentspy``), with helpers to answer.
- ``StreamingResponse``: a backend response whose body the test sends chunk by chunk, recording
  pause/resume/stop from the receiver (backpressure and disconnect tests).
- ``FakeLlamaServer``: a twisted.web resource answering like llama-server, SSE streams included.
- ``InMemoryClient`` / ``parse_response``: a client connection to a Site over a StringTransport.
- ``FakeSupervisor``: what an ``OnDemandModel`` starts and stops, moving a ``Backend`` record
  through its states as a llama-server supervisor would.

Its size is the number of fakes, each small and independent; they live in one public module as
treq's testing module does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, AnyStr, cast

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IProcessProtocol,
    IProcessTransport,
    IPushProducer,
    IReactorProcess,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from llamaproxy.backends.backend import Backend, BackendState

__all__ = [
    "AgentSpy",
    "FakeLlamaServer",
    "FakeProcessReactor",
    "FakeProcessTransport",
    "InMemoryClient",
    "ParsedResponse",
    "RequestRecord",
    "StreamingResponse",
    "StubResponse",
    "parse_response",
    "router_for",
    "sse_chunk",
]


# --- processes ---------------------------------------------------------------------------------


@implementer(IProcessTransport)
class FakeProcessTransport:
    """A child process that exists only in memory; the test decides what it prints and when it ends.

    ``signals`` records every ``signalProcess`` call. After the process ended, ``pid`` is None and
    ``signalProcess`` raises ``ProcessExitedAlready``, as a real one does. When the reactor was
    made with ``respond_to_signals=True``, TERM ends the process with exit code 0 after
    ``term_delay`` seconds of the reactor's clock and KILL ends it at once by signal 9.
    """

    def __init__(
        self,
        reactor: FakeProcessReactor,
        proto: IProcessProtocol,
        executable: bytes | str,
        args: list[bytes | str],
        env: dict[str, str] | dict[bytes, bytes] | None,
        path: bytes | str | None,
        pid: int,
    ) -> None:
        self.reactor = reactor
        self.proto = proto
        self.executable = executable
        self.args = args
        self.env = env
        self.path = path
        self.pid: int | None = pid
        self.signals: list[str | int] = []
        self.written: list[tuple[int, bytes]] = []
        self.closed_fds: list[int] = []

    @property
    def alive(self) -> bool:
        """True until the process ended."""
        return self.pid is not None

    # Test controls.

    def write_stdout(self, data: bytes) -> None:
        """Make the child print ``data`` on its standard output."""
        self.proto.childDataReceived(1, data)

    def write_stderr(self, data: bytes) -> None:
        """Make the child print ``data`` on its standard error."""
        self.proto.childDataReceived(2, data)

    def exit(self, code: int = 0) -> None:
        """End the process with exit ``code`` (``processExited`` then ``processEnded``)."""
        self._end(error.ProcessDone(0) if code == 0 else error.ProcessTerminated(exitCode=code))

    def kill_by_signal(self, signal: int) -> None:
        """End the process as if ``signal`` (a number) killed it."""
        self._end(error.ProcessTerminated(signal=signal))

    def _end(self, reason: error.ProcessDone | error.ProcessTerminated) -> None:
        if self.pid is None:
            raise error.ProcessExitedAlready()
        self.pid = None
        self.proto.processExited(Failure(reason))
        self.proto.processEnded(Failure(reason))

    # IProcessTransport.

    def signalProcess(self, signalID: str | int) -> None:  # noqa: N803
        """Record the signal (and react to it when the reactor says so)."""
        if self.pid is None:
            raise error.ProcessExitedAlready()
        self.signals.append(signalID)
        if not self.reactor.respond_to_signals:
            return
        if signalID in ("KILL", 9):
            self.kill_by_signal(9)
        elif signalID in ("TERM", 15):
            self.reactor.callLater(self.reactor.term_delay, self._exit_if_alive, 0)

    def _exit_if_alive(self, code: int) -> None:
        if self.pid is not None:
            self.exit(code)

    def closeStdin(self) -> None:
        """Record that stdin was closed."""
        self.closed_fds.append(0)

    def closeStdout(self) -> None:
        """Record that stdout was closed."""
        self.closed_fds.append(1)

    def closeStderr(self) -> None:
        """Record that stderr was closed."""
        self.closed_fds.append(2)

    def closeChildFD(self, descriptor: int) -> None:
        """Record that a child file descriptor was closed."""
        self.closed_fds.append(descriptor)

    def writeToChild(self, childFD: int, data: bytes) -> None:  # noqa: N803
        """Record data written to the child."""
        self.written.append((childFD, data))

    def write(self, data: bytes) -> None:
        """Record data written to the child's stdin."""
        self.written.append((0, data))

    def writeSequence(self, data: Iterable[bytes]) -> None:
        """Record data written to the child's stdin."""
        for chunk in data:
            self.write(chunk)

    def loseConnection(self) -> None:
        """Close stdin, stdout and stderr."""
        self.closed_fds.extend([0, 1, 2])

    def getPeer(self) -> IAddress:
        """Processes have no peer address; like Twisted's, return a placeholder."""
        return IPv4Address("TCP", "127.0.0.1", 0)

    def getHost(self) -> IAddress:
        """Processes have no host address; like Twisted's, return a placeholder."""
        return IPv4Address("TCP", "127.0.0.1", 0)


@implementer(IReactorProcess)
class FakeProcessReactor(MemoryReactorClock):
    """A ``MemoryReactorClock`` with a fake ``spawnProcess`` (IReactorProcess + IReactorTime).

    ``spawned`` lists every process started, oldest first; set ``spawn_error`` to make the next
    ``spawnProcess`` calls raise it.
    """

    def __init__(self, respond_to_signals: bool = False, term_delay: float = 0.0) -> None:
        super().__init__()
        self.spawned: list[FakeProcessTransport] = []
        self.spawn_error: Exception | None = None
        self.respond_to_signals = respond_to_signals
        self.term_delay = term_delay
        self._next_pid = 4242

    @property
    def process(self) -> FakeProcessTransport:
        """The most recently spawned process (AssertionError when there is none)."""
        assert self.spawned, "no process was spawned"
        return self.spawned[-1]

    def spawnProcess(
        self,
        processProtocol: IProcessProtocol,  # noqa: N803 - Twisted's names
        executable: bytes | str,
        args: Sequence[bytes | str] = (),
        env: Mapping[AnyStr, AnyStr] | None = None,
        path: bytes | str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,  # noqa: N803
        childFDs: Mapping[int, int | str] | None = None,  # noqa: N803
    ) -> FakeProcessTransport:
        """Record the call, connect the protocol to a new ``FakeProcessTransport``, return it."""
        if self.spawn_error is not None:
            raise self.spawn_error
        process = FakeProcessTransport(
            self,
            processProtocol,
            executable,
            list(args),
            dict(env) if env is not None else None,
            path,
            self._next_pid,
        )
        self._next_pid += 1
        self.spawned.append(process)
        processProtocol.makeConnection(process)
        return process


# --- HTTP client -------------------------------------------------------------------------------


@implementer(IPushProducer)
class _StubBodyTransport:
    """The producer a ``StubResponse`` body protocol sees as its transport."""

    def __init__(self) -> None:
        self.stopped = False
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True

    def loseConnection(self) -> None:
        self.stopped = True

    def abortConnection(self) -> None:
        self.stopped = True


@implementer(IResponse)
class StubResponse:
    """An ``IResponse`` with a fixed status, headers and body, delivered at once.

    ``deliverBody`` gives the whole body in one ``dataReceived`` (unless the protocol stops the
    transfer first) and then ``connectionLost(ResponseDone)``.
    """

    version = (b"HTTP", 1, 1)
    previousResponse: IResponse | None = None
    request: Any = None

    def __init__(self, code: int = 200, body: bytes = b"", headers: Headers | None = None) -> None:
        self.code = code
        self.phrase = b"OK" if code == 200 else b"Stub"
        self.headers = headers if headers is not None else Headers()
        self.body = body
        self.length = len(body) if body else UNKNOWN_LENGTH
        self.transport = _StubBodyTransport()

    def deliverBody(self, protocol: Protocol) -> None:
        """Send the body to ``protocol`` and finish."""
        protocol.makeConnection(cast(ITransport, self.transport))
        if self.body and not self.transport.stopped:
            protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))

    def setPreviousResponse(self, response: IResponse) -> None:
        """Part of IResponse; remembered."""
        self.previousResponse = response


@dataclass
class RequestRecord:
    """One call to ``AgentSpy.request``, with helpers to answer it."""

    method: bytes
    uri: bytes
    headers: Headers | None
    body_producer: IBodyProducer | None
    deferred: Deferred[IResponse] = field(repr=False)
    #: True when the caller cancelled the request before it was answered.
    cancelled: bool = False

    @property
    def pending(self) -> bool:
        """True until the request is answered, failed or cancelled."""
        return not self.deferred.called

    def respond(self, code: int = 200, body: bytes = b"", headers: Headers | None = None) -> None:
        """Answer with a ``StubResponse``."""
        self.deferred.callback(cast(IResponse, StubResponse(code, body, headers)))

    def fail(self, reason: BaseException | Failure) -> None:
        """Fail the request, e.g. with ``twisted.internet.error.ConnectionRefusedError()``."""
        self.deferred.errback(reason if isinstance(reason, Failure) else Failure(reason))


@implementer(IAgent)
class AgentSpy:
    """An ``IAgent`` that records each request and returns a Deferred the test fires.

    ``requests`` holds a ``RequestRecord`` per call, oldest first. ``on_request``, when given, is
    called with each new record, e.g. to answer at once (``lambda r: r.respond(200)``); it can be
    replaced at any time. Cancelling a returned Deferred errbacks it with ``CancelledError`` and
    sets ``record.cancelled``.
    """

    def __init__(self, on_request: Callable[[RequestRecord], object] | None = None) -> None:
        self.requests: list[RequestRecord] = []
        self.on_request = on_request

    @property
    def pending(self) -> list[RequestRecord]:
        """The requests not answered yet."""
        return [r for r in self.requests if r.pending]

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,  # noqa: N803 - Twisted's name
    ) -> Deferred[IResponse]:
        """Record the request; the returned Deferred fires when the test answers."""
        if not isinstance(method, bytes) or not isinstance(uri, bytes):
            raise TypeError("method and uri must be bytes")
        if headers is not None and not isinstance(headers, Headers):
            raise TypeError("headers must be a Headers instance")

        record: RequestRecord

        def mark_cancelled(_: Deferred[IResponse]) -> None:
            record.cancelled = True

        deferred: Deferred[IResponse] = Deferred(mark_cancelled)
        record = RequestRecord(method, uri, headers, bodyProducer, deferred)
        self.requests.append(record)
        if self.on_request is not None:
            self.on_request(record)
        return deferred


# --- backend responses and a fake llama-server ---------------------------------------------------


@implementer(IResponse)
class StreamingResponse:
    """An ``IResponse`` whose body the test sends piece by piece, like a backend streaming SSE.

    ``send(data)`` delivers a chunk (if the body protocol is connected and not stopped),
    ``finish()`` ends the body cleanly and ``fail(reason)`` breaks it. ``transport`` records
    ``paused``/``stopped``, so tests can check backpressure and disconnect propagation.
    """

    version = (b"HTTP", 1, 1)
    previousResponse: IResponse | None = None
    request: Any = None

    def __init__(
        self, code: int = 200, headers: Headers | None = None, length: int | None = None
    ) -> None:
        self.code = code
        self.phrase = b"OK" if code == 200 else b"Streaming"
        self.headers = headers if headers is not None else Headers(
            {b"content-type": [b"text/event-stream"]}
        )
        self.length: int | object = UNKNOWN_LENGTH if length is None else length
        self.transport = _StubBodyTransport()
        self.protocol: Protocol | None = None

    def deliverBody(self, protocol: Protocol) -> None:
        """Connect the body protocol; chunks follow from ``send``."""
        self.protocol = protocol
        protocol.makeConnection(cast(ITransport, self.transport))

    def send(self, data: bytes) -> None:
        """Deliver one chunk of body, unless the receiver stopped the transfer."""
        assert self.protocol is not None, "deliverBody was not called"
        if not self.transport.stopped:
            self.protocol.dataReceived(data)

    def finish(self) -> None:
        """End the body cleanly."""
        assert self.protocol is not None, "deliverBody was not called"
        self.protocol.connectionLost(Failure(ResponseDone()))

    def fail(self, reason: BaseException | None = None) -> None:
        """Break the body, as a backend that dies mid-response does."""
        from twisted.web.client import ResponseFailed

        assert self.protocol is not None, "deliverBody was not called"
        failure = Failure(reason or ResponseFailed([Failure(error.ConnectionLost())]))
        self.protocol.connectionLost(failure)

    def setPreviousResponse(self, response: IResponse) -> None:
        """Part of IResponse; remembered."""
        self.previousResponse = response


def sse_chunk(content: str, index: int = 0, finish_reason: str | None = None) -> bytes:
    """One ``data: {chat.completion.chunk}`` SSE event as llama-server sends it."""
    delta: dict[str, Any] = {"content": content} if finish_reason is None else {}
    event = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "fake",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


class FakeLlamaServer(Resource):
    """A twisted.web resource that answers like llama-server, for in-memory gateway tests.

    Serves ``/health`` (200, or 503 "Loading model" while ``loading``), ``/v1/models``, and
    ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``; streaming chat/completions
    send one SSE event per word of ``reply``, ``interval`` seconds apart on ``clock``, then
    ``data: [DONE]``. Checks ``Authorization: Bearer <api_key>`` like llama-server's --api-key.
    ``requests`` records (method, path, headers, parsed JSON body); ``cancelled`` counts streams
    whose client went away before the end.
    """

    isLeaf = True

    def __init__(
        self,
        clock: IReactorTime,
        api_key: str | None = None,
        model: str = "fake",
        reply: str = "Hello from the fake llama server",
        interval: float = 0.1,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.api_key = api_key
        self.model = model
        self.reply = reply
        self.interval = interval
        self.loading = False
        self.requests: list[tuple[bytes, bytes, Headers, Any]] = []
        self.cancelled = 0

    def render(self, request: Any) -> bytes | int:
        body: Any = None
        raw = request.content.read() if request.content is not None else b""
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw
        self.requests.append((request.method, request.path, request.requestHeaders, body))
        request.setHeader(b"Access-Control-Allow-Origin", request.getHeader(b"origin") or b"*")
        if request.path == b"/health":
            if self.loading:
                return self._error(request, 503, "Loading model", "unavailable_error")
            return self._json(request, {"status": "ok"})
        if self.api_key is not None:
            presented = request.getHeader(b"authorization") or b""
            if presented != b"Bearer " + self.api_key.encode():
                return self._error(request, 401, "Invalid API Key", "authentication_error")
        if self.loading:
            return self._error(request, 503, "Loading model", "unavailable_error")
        if request.path == b"/v1/models":
            return self._json(request, {"object": "list", "data": [
                {"id": self.model, "object": "model", "owned_by": "llamacpp", "created": 0}
            ]})
        if request.path in (b"/v1/chat/completions", b"/v1/completions"):
            if isinstance(body, dict) and body.get("stream"):
                return self._stream(request, request.path == b"/v1/chat/completions")
            if request.path == b"/v1/completions":
                choice: dict[str, Any] = {"index": 0, "text": self.reply, "finish_reason": "stop"}
            else:
                choice = {"index": 0, "finish_reason": "stop",
                          "message": {"role": "assistant", "content": self.reply}}
            return self._json(request, {"object": "chat.completion", "model": self.model,
                                        "choices": [choice]})
        if request.path == b"/v1/embeddings":
            return self._json(request, {"object": "list", "data": [
                {"object": "embedding", "index": 0, "embedding": [0.0, 1.0]}
            ]})
        return self._error(request, 404, "File Not Found", "not_found_error")

    def _json(self, request: Any, doc: Any, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return json.dumps(doc).encode()

    def _error(self, request: Any, code: int, message: str, kind: str) -> bytes:
        return self._json(request, {"error": {"code": code, "message": message, "type": kind}},
                          code)

    def _stream(self, request: Any, chat: bool) -> int:
        request.setHeader(b"Content-Type", b"text/event-stream")
        words = self.reply.split(" ")
        events = [sse_chunk(w if i == 0 else " " + w) for i, w in enumerate(words)]
        events += [sse_chunk("", finish_reason="length"), b"data: [DONE]\n\n"]
        state = {"gone": False}

        def gone(_: object) -> None:
            state["gone"] = True
            self.cancelled += 1

        request.notifyFinish().addErrback(gone)

        def send_next() -> None:
            if state["gone"]:
                return
            request.write(events.pop(0))
            if events:
                self.clock.callLater(self.interval, send_next)
            else:
                request.finish()

        self.clock.callLater(0, send_next)
        return NOT_DONE_YET


# --- the client side of a gateway, in memory ---------------------------------------------------


@dataclass
class ParsedResponse:
    """An HTTP/1.1 response read back from bytes a server wrote."""

    status: int
    headers: dict[str, list[str]]
    body: bytes
    complete: bool

    def header(self, name: str) -> str | None:
        """The last value of a header (case-insensitive), or None."""
        values = self.headers.get(name.lower())
        return values[-1] if values else None

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


def parse_response(raw: bytes) -> ParsedResponse:
    """Parse one HTTP/1.1 response (Content-Length, chunked, or close-delimited)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if "chunked" in ",".join(headers.get("transfer-encoding", [])):
        body, complete = b"", False
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                complete = True
                break
            body, rest = body + rest[:size], rest[size + 2:]
        return ParsedResponse(status, headers, body, complete)
    if "content-length" in headers:
        length = int(headers["content-length"][-1])
        return ParsedResponse(status, headers, rest[:length], len(rest) >= length)
    return ParsedResponse(status, headers, rest, True)


class InMemoryClient:
    """One client connection to a Site, over a StringTransport (no sockets, no reactor)."""

    def __init__(self, site: Any, peer: str = "127.0.0.1") -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        self.channel = site.buildProtocol(IPv4Address("TCP", peer, 40000))
        self.channel.makeConnection(self.transport)

    @property
    def http_channel(self) -> Any:
        """The HTTPChannel behind the protocol (for pauseProducing/resumeProducing)."""
        return getattr(self.channel, "_channel", self.channel)

    def send(self, data: bytes) -> None:
        """Bytes from the client to the server."""
        self.channel.dataReceived(data)

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Send a whole HTTP/1.1 request with Content-Length framing."""
        lines = [f"{method} {path} HTTP/1.1", "Host: gateway"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    @property
    def written(self) -> bytes:
        """Everything the server wrote so far."""
        return bytes(self.transport.value())

    def response(self) -> ParsedResponse:
        """The response written so far, parsed."""
        return parse_response(self.written)

    @property
    def closed(self) -> bool:
        """True once the server closed or aborted the connection."""
        return bool(self.transport.disconnecting or getattr(self.transport, "disconnected", False))

    def disconnect(self) -> None:
        """The client goes away (the transport lets go of its producer, as TCP's does)."""
        if self.transport.producer is not None:
            self.transport.unregisterProducer()
        self.channel.connectionLost(Failure(error.ConnectionLost()))


# --- a one-backend router ------------------------------------------------------------------------


def router_for(backend: Any, admission: Any, clock: Any) -> Any:
    """A Router over one existing ``Backend`` status and its ``Admission`` (no breaker),
    serving ``backend.model`` and routing every other model name to it: the single-backend
    mode, for tests that build a GatewayResource by hand."""
    from llamaproxy.backends.breaker import BreakerSettings
    from llamaproxy.backends.config_file import (
        BackendsTable,
        FailoverSettings,
        ModelSpec,
        RemoteBackendSpec,
        Strategy,
    )
    from llamaproxy.backends.routing import Router

    no_breaker = BreakerSettings(enabled=False)
    spec = RemoteBackendSpec(
        name=backend.name, models=(backend.model,), slots=admission.max_concurrent,
        breaker=no_breaker, base_url=backend.base_url,
    )
    table = BackendsTable(
        backends=(spec,),
        models=(ModelSpec(backend.model, Strategy.PRIORITY, (), True),),
        default_model=backend.model,
        breaker=no_breaker,
        failover=FailoverSettings(),
        route_unknown_models=True,
    )
    return Router.build(table, clock, {spec.name: backend}, {spec.name: admission})


# --- an on-demand model's supervisor -----------------------------------------------------------


class FakeSupervisor:
    """A ``LlamaServerSupervisor`` stand-in for ``OnDemandModel``: starting moves the
    ``Backend`` record to STARTING (and to READY after ``load_time`` seconds, if given),
    ``loaded`` to READY, ``crash`` to BACKOFF (as the supervisor does when the child ends),
    stopping to STOPPED after ``stop_delay`` seconds (at once from BACKOFF: no process)."""

    def __init__(self, backend: Backend, clock: IReactorTime, load_time: float | None = None,
                 stop_delay: float = 0.0) -> None:
        self.backend = backend
        self.clock = clock
        self.running = 0
        self.starts = 0
        self.stops = 0
        self.load_time = load_time
        self.stop_delay = stop_delay

    def startService(self) -> None:
        self.running = 1
        self.starts += 1
        self.backend.set_state(BackendState.STARTING)
        if self.load_time is not None:
            self.clock.callLater(self.load_time, self.loaded)

    def loaded(self) -> None:
        """The model finished loading: READY."""
        if self.running:
            self.backend.set_state(BackendState.READY)

    def crash(self, why: str) -> None:
        """The child ended while loading, ``why`` being its exit description."""
        self.backend.last_exit = why
        self.backend.set_state(BackendState.BACKOFF)

    def stopService(self) -> Deferred[None]:
        self.running = 0
        self.stops += 1
        if self.backend.state in (BackendState.STOPPED, BackendState.BACKOFF):
            self.backend.set_state(BackendState.STOPPED)  # no process: stopped at once
            return succeed(None)
        self.backend.set_state(BackendState.STOPPING)
        done: Deferred[None] = Deferred()

        def stopped() -> None:
            self.backend.set_state(BackendState.STOPPED)
            done.callback(None)

        self.clock.callLater(self.stop_delay, stopped)
        return done
