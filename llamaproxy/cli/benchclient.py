"""The HTTP client of ``llamaproxy bench``: one measured request at a time, stdlib only.

A small HTTP/1.1 client on asyncio streams (keep-alive, Content-Length and chunked bodies, TLS for
``https``), an incremental server-sent-events parser, and the two measured requests the benchmark
is made of: a ``GET`` timed from the write of the request to the end of its body, and a streamed
chat completion timed to its first non-empty ``delta.content`` (TTFT) and to the end.

Stdlib only on purpose: the ``llamaproxy`` console script must work in a plain ``pip install .``
environment, and a load generator should not spend its time in a general-purpose client. The
clock starts when the request is written on an already open connection: connecting (and the TLS
handshake) is never part of a measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from llamaproxy import __version__

USER_AGENT = f"llamaproxy-bench/{__version__}"

#: Longest response head (status line and headers) accepted.
MAX_HEAD = 64 * 1024
#: Most bytes of an error body kept for the report.
ERROR_BODY_CHARS = 200
#: Idle deadlines are pushed forward at most this often (seconds): cheap on hot streams.
_TOUCH_EVERY = 1.0
_CLOSED_BEFORE_RESPONSE = "connection closed before a response"


class BenchHTTPError(Exception):
    """The server broke HTTP/1.1 (or the connection ended mid-response)."""


@dataclass(frozen=True)
class Target:
    """A server to measure: where it is, and the API key to send it (if any)."""

    url: str
    scheme: str
    host: str
    port: int
    base_path: str
    api_key: str | None = None

    @classmethod
    def from_url(cls, url: str, api_key: str | None = None) -> Target:
        """Parse ``http[s]://host[:port][/prefix]``; ValueError for anything else."""
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        if not parts.hostname:
            raise ValueError(f"no host in URL {url!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"the URL must not have a query, fragment or user info: {url!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"bad port in URL {url!r}") from None
        return cls(
            url=url.strip().rstrip("/"),
            scheme=parts.scheme,
            host=parts.hostname,
            port=port,
            base_path=parts.path.rstrip("/"),
            api_key=api_key or None,
        )

    @property
    def host_header(self) -> str:
        """The ``Host`` header value."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


class SSEParser:
    """Incremental text/event-stream parser: bytes in, the ``data`` of each complete event out.

    Lines end with LF or CRLF; a blank line ends an event; several ``data:`` lines of one event
    are joined with LF; comments (``:``) and other fields are ignored. An event the stream ends in
    the middle of is dropped, as the SSE specification says.
    """

    def __init__(self) -> None:
        self._tail = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event completed by ``chunk``."""
        lines = (self._tail + chunk).split(b"\n") if self._tail else chunk.split(b"\n")
        self._tail = lines.pop()
        events: list[bytes] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
                continue
            name, _, value = line.partition(b":")
            if name == b"data":
                self._data.append(value[1:] if value.startswith(b" ") else value)
        return events


@dataclass
class Response:
    """A response head, and how its body is framed."""

    status: int
    reason: str
    headers: dict[str, str]
    chunked: bool = False
    length: int | None = None
    #: True when the connection cannot be reused after this response.
    closes: bool = False


class Connection:
    """One keep-alive HTTP/1.1 connection to a target, reopened when the server closes it.

    Every request runs under ``deadline()``: it fails with TimeoutError after ``read_timeout``
    seconds without any byte from the server.
    """

    def __init__(
        self, target: Target, connect_timeout: float = 10.0, read_timeout: float = 120.0
    ) -> None:
        self.target = target
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._deadline: asyncio.Timeout | None = None
        self._touched = 0.0

    @property
    def is_open(self) -> bool:
        """True while a connection is open (it may still have been closed by the server)."""
        return self._writer is not None and not self._writer.is_closing()

    async def open(self) -> None:
        """Connect unless a usable connection is already open."""
        if self._reader is not None and self._writer is not None:
            if not self._reader.at_eof() and not self._writer.is_closing():
                return
            await self.close()
        context: ssl.SSLContext | None = None
        if self.target.scheme == "https":
            context = ssl.create_default_context()
        async with asyncio.timeout(self.connect_timeout):
            self._reader, self._writer = await asyncio.open_connection(
                self.target.host, self.target.port, ssl=context, limit=MAX_HEAD
            )

    async def close(self) -> None:
        """Close the connection (quietly)."""
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @contextlib.asynccontextmanager
    async def deadline(self) -> AsyncIterator[None]:
        """Fail with TimeoutError after ``read_timeout`` s of silence; close on any error."""
        try:
            async with asyncio.timeout(self.read_timeout) as deadline:
                self._deadline = deadline
                self._touched = asyncio.get_running_loop().time()
                yield
        except BaseException:
            await self.close()
            raise
        finally:
            self._deadline = None

    def _touch(self) -> None:
        if self._deadline is not None:
            now = asyncio.get_running_loop().time()
            if now - self._touched > _TOUCH_EVERY:
                self._touched = now
                self._deadline.reschedule(now + self.read_timeout)

    async def send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> float:
        """Write one request (connecting first if needed); returns ``perf_counter()`` at the
        write, which is where every measurement starts."""
        await self.open()
        assert self._writer is not None
        lines = [
            f"{method} {self.target.base_path}{path} HTTP/1.1",
            f"Host: {self.target.host_header}",
            f"User-Agent: {USER_AGENT}",
            "Accept: */*",
        ]
        if self.target.api_key:
            lines.append(f"Authorization: Bearer {self.target.api_key}")
        if body is not None:
            lines.append("Content-Type: application/json")
            lines.append(f"Content-Length: {len(body)}")
        lines.extend(f"{name}: {value}" for name, value in headers)
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
        started = time.perf_counter()
        self._writer.write(data)
        await self._writer.drain()
        return started

    async def request(
        self, method: str, path: str, body: bytes | None = None
    ) -> tuple[float, Response]:
        """Send a request and read its response head: (``perf_counter()`` at the write, head).

        A keep-alive connection the server closed while idle (llama-server does after 5 s) is
        only found out when the request gets no answer at all: then the request is sent once
        more on a new connection, and timed from there.
        """
        for attempt in (1, 2):
            reused = self.is_open
            try:
                started = await self.send(method, path, body)
                return started, await self.read_head(method)
            except (BenchHTTPError, ConnectionError) as e:
                stale = isinstance(e, ConnectionError) or str(e) == _CLOSED_BEFORE_RESPONSE
                if attempt == 2 or not reused or not stale:
                    raise
                await self.close()
        raise AssertionError("unreachable")

    async def read_head(self, method: str = "GET") -> Response:
        """Read the status line and headers of the next (final, non-1xx) response."""
        while True:
            response = await self._read_one_head(method)
            if not 100 <= response.status < 200:
                return response

    async def _read_one_head(self, method: str) -> Response:
        reader = self._reader
        if reader is None:
            raise BenchHTTPError("not connected")
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            raise BenchHTTPError(_CLOSED_BEFORE_RESPONSE) from None
        except asyncio.LimitOverrunError:
            raise BenchHTTPError("response head too large") from None
        self._touch()
        status_line, *header_lines = raw[:-4].decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise BenchHTTPError(f"bad status line {status_line[:80]!r}")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        status = int(code)
        connection = headers.get("connection", "").lower()
        response = Response(status, reason, headers)
        response.closes = "close" in connection or (
            version == "HTTP/1.0" and "keep-alive" not in connection
        )
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            response.length = 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            response.chunked = True
        elif "content-length" in headers:
            try:
                response.length = int(headers["content-length"])
            except ValueError:
                raise BenchHTTPError("bad Content-Length") from None
        else:
            response.closes = True  # delimited by the end of the connection
        return response

    async def body(self, response: Response) -> AsyncIterator[bytes]:
        """The response body, decoded from its framing, as it arrives."""
        reader = self._reader
        if reader is None:
            raise BenchHTTPError("not connected")
        try:
            if response.chunked:
                while True:
                    size_line = await reader.readuntil(b"\r\n")
                    self._touch()
                    try:
                        size = int(size_line.split(b";", 1)[0], 16)
                    except ValueError:
                        raise BenchHTTPError("bad chunk size") from None
                    if size == 0:
                        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                            pass
                        break
                    chunk = await reader.readexactly(size + 2)
                    self._touch()
                    yield chunk[:-2]
            elif response.length is not None:
                remaining = response.length
                while remaining > 0:
                    data = await reader.read(min(remaining, 1 << 16))
                    if not data:
                        raise BenchHTTPError("connection closed mid-body")
                    self._touch()
                    remaining -= len(data)
                    yield data
            else:
                while data := await reader.read(1 << 16):
                    self._touch()
                    yield data
        except asyncio.IncompleteReadError:
            raise BenchHTTPError("connection closed mid-body") from None
        except asyncio.LimitOverrunError:
            raise BenchHTTPError("chunk header too large") from None
        if response.closes:
            await self.close()

    async def read_body(self, response: Response, limit: int | None = None) -> bytes:
        """The whole body (or its first ``limit`` bytes; the rest is read and dropped)."""
        kept: list[bytes] = []
        size = 0
        async for data in self.body(response):
            if limit is None or size < limit:
                kept.append(data)
                size += len(data)
        body = b"".join(kept)
        return body if limit is None else body[:limit]


@dataclass
class GetResult:
    """One timed GET: from the write of the request to the end of the body."""

    ok: bool
    latency: float
    status: int | None = None
    error: str | None = None


@dataclass
class StreamResult:
    """One timed streamed chat completion."""

    ok: bool
    latency: float
    status: int | None = None
    error: str | None = None
    #: Seconds from the write of the request to the first non-empty ``delta.content``.
    ttft: float | None = None
    tokens: int = 0
    #: "usage" (the server's ``usage.completion_tokens``) or "deltas" (content deltas counted).
    token_source: str = "deltas"
    #: perf_counter() of each content delta, relative to the write of the request.
    arrivals: list[float] = field(default_factory=list, repr=False)

    @property
    def tokens_per_s(self) -> float | None:
        """Tokens over the whole request time, TTFT included (the older benchmark's rate)."""
        return self.tokens / self.latency if self.ok and self.latency > 0 else None


def chat_body(prompt: str, max_tokens: int, model: str = "default") -> bytes:
    """The streamed chat request the benchmark sends (asking for usage in the stream)."""
    return json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timeout"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _error_text(status: int, body: bytes) -> str:
    return f"HTTP {status}: {body.decode('utf-8', 'replace')[:ERROR_BODY_CHARS]}"


async def timed_get(connection: Connection, path: str) -> GetResult:
    """GET ``path``; a 2xx with its whole body is a success."""
    started = time.perf_counter()
    try:
        async with connection.deadline():
            started, response = await connection.request("GET", path)
            body = await connection.read_body(response, ERROR_BODY_CHARS)
    except (OSError, TimeoutError, BenchHTTPError, ssl.SSLError) as e:
        return GetResult(False, time.perf_counter() - started, error=_describe(e))
    latency = time.perf_counter() - started
    if not 200 <= response.status < 300:
        return GetResult(False, latency, response.status, _error_text(response.status, body))
    return GetResult(True, latency, response.status)


def _content_of(doc: Any) -> str | None:
    """``choices[0].delta.content`` of a stream chunk, if it is a non-empty string."""
    choices = doc.get("choices")
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        return None
    delta = choices[0].get("delta")
    if not isinstance(delta, dict):
        return None
    content = delta.get("content")
    return content if isinstance(content, str) and content else None


async def timed_chat_stream(
    connection: Connection, body: bytes, path: str = "/v1/chat/completions"
) -> StreamResult:
    """POST a streamed chat completion and time it; never raises for HTTP or network errors."""
    started = time.perf_counter()
    result = StreamResult(ok=False, latency=0.0)
    usage_tokens: int | None = None
    deltas = 0
    try:
        async with connection.deadline():
            started, response = await connection.request("POST", path, body)
            result.status = response.status
            if response.status != 200:
                error_body = await connection.read_body(response, ERROR_BODY_CHARS)
                result.error = _error_text(response.status, error_body)
            else:
                parser = SSEParser()
                async for data in connection.body(response):
                    now = time.perf_counter()
                    for payload in parser.feed(data):
                        if payload == b"[DONE]":
                            continue
                        try:
                            doc = json.loads(payload)
                        except ValueError:
                            continue
                        if not isinstance(doc, dict):
                            continue
                        if "error" in doc and result.error is None:
                            result.error = f"error event: {payload[:ERROR_BODY_CHARS]!r}"
                        usage = doc.get("usage")
                        if isinstance(usage, dict):
                            completion = usage.get("completion_tokens")
                            if isinstance(completion, int):
                                usage_tokens = completion
                        if _content_of(doc) is not None:
                            deltas += 1
                            result.arrivals.append(now - started)
                            if result.ttft is None:
                                result.ttft = now - started
                result.ok = result.error is None
    except (OSError, TimeoutError, BenchHTTPError, ssl.SSLError) as e:
        result.ok = False
        result.error = _describe(e)
    result.latency = time.perf_counter() - started
    if usage_tokens is not None:
        result.tokens, result.token_source = usage_tokens, "usage"
    else:
        result.tokens = deltas
    return result
