"""A fast fake OpenAI backend for benchmarks: raw asyncio HTTP/1.1 with keep-alive.

It must never be the bottleneck, so it is an ``asyncio.Protocol`` with a minimal parser (no
framework, no JSON parsing of requests: ``stream``, ``max_tokens`` and ``include_usage`` are found
with regular expressions) and precomputed bodies. Stream sends are batched per millisecond on one
timer per due time, however many streams are open.

- ``GET /health`` → ``{"status": "ok"}``; ``GET /v1/models`` → one model, ``fake``.
- ``POST /v1/chat/completions`` (and ``/v1/completions``): non-streaming → a ``chat.completion``
  JSON with ``usage``; ``"stream": true`` → ``N`` content events, ``M`` ms apart (the first at
  once, with the headers), then a ``finish_reason`` event, a ``usage`` event when
  ``stream_options.include_usage`` is set, and ``data: [DONE]``. Each content event carries
  ``"sent_ns"``: ``time.monotonic_ns()`` when it was written, for delivery-delay measurements
  (the monotonic clock is shared by every process on the machine). ``N`` is the request's
  ``max_tokens`` (else ``--events``); ``M`` is ``--interval-ms``.
- ``GET /stats`` → ``{"connections": …, "requests": …}`` accepted so far (whether a proxy reuses
  its upstream connections).
- Anything else → 404 JSON. Request bodies must have a Content-Length (411 otherwise).
- Connections stay open unless a request says ``Connection: close``; with
  ``--close-after-stream`` they also close after each streamed answer, as llama-server's do
  (although it answers ``Keep-Alive``).

    python -m bench.fake_backend --port 9100 [--events 50] [--interval-ms 20]
                                 [--close-after-stream]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import signal
import threading
import time
from dataclasses import dataclass

_STREAM = re.compile(rb'"stream"\s*:\s*true')
_MAX_TOKENS = re.compile(rb'"max_tokens"\s*:\s*(\d+)')
_INCLUDE_USAGE = re.compile(rb'"include_usage"\s*:\s*true')
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r]*chunked", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:[^\r]*close", re.IGNORECASE)
_MAX_HEAD = 64 * 1024
#: Most events one stream may have (max_tokens is capped to this).
MAX_EVENTS = 100_000
CREATED = 1_700_000_000


@dataclass(frozen=True)
class BackendConfig:
    """How the fake answers."""

    events: int = 50
    interval_ms: float = 20.0
    model: str = "fake"
    #: Close the connection after each streamed answer, as llama-server does although it
    #: answers ``Keep-Alive`` (a proxy cannot reuse it: one connection per stream).
    close_after_stream: bool = False


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\nServer: fake-openai\r\nContent-Type: "
        + content_type + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def _json_response(status: str, document: object) -> bytes:
    return _response(status, json.dumps(document, separators=(",", ":")).encode())


_HEALTH = _json_response("200 OK", {"status": "ok"})
_NOT_FOUND = _json_response(
    "404 Not Found", {"error": {"message": "not found", "type": "not_found_error", "code": 404}}
)
_LENGTH_REQUIRED = _json_response(
    "411 Length Required",
    {"error": {"message": "Content-Length required", "type": "invalid_request_error"}},
)
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: fake-openai\r\nContent-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class Responses:
    """Precomputed response bytes, per number of tokens; and the server's counters."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.connections = 0
        self.requests = 0
        self.models = _json_response("200 OK", {
            "object": "list",
            "data": [{"id": config.model, "object": "model", "created": CREATED,
                      "owned_by": "fake"}],
        })
        self._completions: dict[int, bytes] = {}
        model = json.dumps(config.model)
        # One content event; %d is replaced by the send time (monotonic ns).
        self.event_template = (
            b'data: {"id":"chatcmpl-fake","object":"chat.completion.chunk","created":'
            + str(CREATED).encode() + b',"model":' + model.encode()
            + b',"sent_ns":%d,"choices":[{"index":0,"delta":{"content":"tok "},'
            b'"finish_reason":null}]}\n\n'
        )
        self.finish_event = (
            b'data: {"id":"chatcmpl-fake","object":"chat.completion.chunk","created":'
            + str(CREATED).encode() + b',"model":' + model.encode()
            + b',"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
        )
        self._usage_events: dict[int, bytes] = {}

    def completion(self, tokens: int) -> bytes:
        """The whole non-streamed response for ``tokens`` tokens."""
        cached = self._completions.get(tokens)
        if cached is None:
            cached = _json_response("200 OK", {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": CREATED,
                "model": self.config.model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "tok " * tokens}}],
                "usage": {"prompt_tokens": 8, "completion_tokens": tokens,
                          "total_tokens": 8 + tokens},
            })
            if len(self._completions) < 1024:
                self._completions[tokens] = cached
        return cached

    def ending(self, tokens: int, usage: bool) -> bytes:
        """Everything after the last content event, as chunks, with the terminating chunk."""
        end = _chunk(self.finish_event)
        if usage:
            event = self._usage_events.get(tokens)
            if event is None:
                event = (
                    b'data: {"id":"chatcmpl-fake","object":"chat.completion.chunk","created":'
                    + str(CREATED).encode() + b',"model":'
                    + json.dumps(self.config.model).encode()
                    + b',"choices":[],"usage":{"prompt_tokens":8,"completion_tokens":'
                    + str(tokens).encode() + b',"total_tokens":' + str(8 + tokens).encode()
                    + b"}}\n\n"
                )
                self._usage_events[tokens] = event
            end += _chunk(event)
        return end + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class Ticker:
    """Calls ``send_next`` of streams at their due times, one timer per distinct millisecond."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._due: dict[int, list[Stream]] = {}

    def schedule(self, stream: Stream, when: float) -> None:
        """Run ``stream.send_next()`` at loop time ``when`` (rounded up to the millisecond)."""
        key = math.ceil(when * 1000)
        batch = self._due.get(key)
        if batch is None:
            batch = self._due[key] = []
            self.loop.call_at(key / 1000, self._fire, key)
        batch.append(stream)

    def _fire(self, key: int) -> None:
        for stream in self._due.pop(key, ()):
            stream.send_next()


class Stream:
    """One SSE response in progress on a connection."""

    def __init__(
        self, protocol: BackendProtocol, events: int, usage: bool, started: float
    ) -> None:
        self.protocol = protocol
        self.events = events
        self.usage = usage
        self.started = started
        self.sent = 0
        self.cancelled = False

    def send_next(self) -> None:
        """Write the next content event (and the ending after the last one)."""
        if self.cancelled:
            return
        protocol = self.protocol
        responses = protocol.responses
        data = _chunk(responses.event_template % time.monotonic_ns())
        self.sent += 1
        if self.sent == 1:
            data = _STREAM_HEAD + data
        if self.sent >= self.events:
            protocol.write(data + responses.ending(self.events, self.usage))
            protocol.stream_done()
            return
        protocol.write(data)
        interval = protocol.config.interval_ms / 1000
        if interval <= 0:
            protocol.loop.call_soon(self.send_next)
        else:
            protocol.ticker.schedule(self, self.started + self.sent * interval)


class BackendProtocol(asyncio.Protocol):
    """One client connection: parse requests, answer them in order."""

    def __init__(self, responses: Responses, ticker: Ticker) -> None:
        self.responses = responses
        self.config = responses.config
        self.ticker = ticker
        self.loop = ticker.loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.stream: Stream | None = None
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.responses.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream is not None:
            self.stream.cancelled = True
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.stream is None:
            self._process()

    def write(self, data: bytes) -> None:
        """Write to the client if it is still connected."""
        if self.transport is not None:
            self.transport.write(data)

    def stream_done(self) -> None:
        """The current stream ended: go on with pipelined requests."""
        self.stream = None
        if self.close_after or self.config.close_after_stream:
            self._close()
        elif self.buffer:
            self._process()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _process(self) -> None:
        buffer = self.buffer
        while self.stream is None and self.transport is not None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    self._close()
                return
            head = bytes(buffer[:end + 2])
            length_match = _CONTENT_LENGTH.search(head)
            length = int(length_match[1]) if length_match else 0
            if length_match is None and _CHUNKED.search(head):
                self.write(_LENGTH_REQUIRED)
                self._close()
                return
            if len(buffer) < end + 4 + length:
                return
            body = bytes(buffer[end + 4:end + 4 + length])
            del buffer[:end + 4 + length]
            self.close_after = _CLOSE.search(head) is not None
            self._answer(head, body)
            if self.close_after and self.stream is None:
                self._close()
                return

    def _answer(self, head: bytes, body: bytes) -> None:
        line_end = head.find(b"\r\n")
        method, _, rest = head[:line_end].partition(b" ")
        target = rest.rpartition(b" ")[0].split(b"?", 1)[0]
        self.responses.requests += 1
        if method == b"POST" and target in (b"/v1/chat/completions", b"/v1/completions"):
            match = _MAX_TOKENS.search(body)
            tokens = int(match[1]) if match else self.config.events
            tokens = max(1, min(tokens, MAX_EVENTS))
            if _STREAM.search(body):
                usage = _INCLUDE_USAGE.search(body) is not None
                self.stream = Stream(self, tokens, usage, self.loop.time())
                self.stream.send_next()
            else:
                self.write(self.responses.completion(tokens))
        elif method in (b"GET", b"HEAD") and target == b"/health":
            self.write(_HEALTH)
        elif method in (b"GET", b"HEAD") and target == b"/v1/models":
            self.write(self.responses.models)
        elif method == b"GET" and target == b"/stats":
            self.write(_json_response("200 OK", {"connections": self.responses.connections,
                                                 "requests": self.responses.requests}))
        else:
            self.write(_NOT_FOUND)


async def serve(
    config: BackendConfig, host: str = "127.0.0.1", port: int = 0, backlog: int = 4096
) -> asyncio.Server:
    """Start listening; the server's ``sockets[0]`` tells the port."""
    loop = asyncio.get_running_loop()
    responses = Responses(config)
    ticker = Ticker(loop)
    return await loop.create_server(
        lambda: BackendProtocol(responses, ticker), host, port, backlog=backlog, reuse_address=True
    )


class BackendThread:
    """The fake backend on its own event loop in a daemon thread (for tests)."""

    def __init__(self, config: BackendConfig | None = None) -> None:
        self.config = config or BackendConfig()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-backend", daemon=True)

    @property
    def url(self) -> str:
        """Base URL of the running fake."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> BackendThread:
        """Start and wait until it listens."""
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake backend did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(serve(self.config))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    def stop(self) -> None:
        """Stop the loop and wait for the thread."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


async def _main(args: argparse.Namespace) -> None:
    config = BackendConfig(args.events, args.interval_ms,
                           close_after_stream=args.close_after_stream)
    server = await serve(config, args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"fake backend on {args.host}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        if args.lifetime > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.lifetime)
        else:
            await stop.wait()


def main() -> None:
    """Command line: run the fake backend until SIGTERM/SIGINT (or --lifetime seconds)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--events", type=int, default=50, help="events per stream by default")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="ms between events")
    parser.add_argument("--close-after-stream", action="store_true",
                        help="close the connection after each streamed answer (as llama-server)")
    parser.add_argument("--lifetime", type=float, default=3600.0,
                        help="exit after this many seconds at the latest (0: never)")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
