"""Load generators of the overhead harness, each run as its own process: many concurrent SSE
streams, and a closed-loop plain-request load (the stand-in for ``wrk`` when it is absent).

Both use :mod:`llamaproxy.cli.benchclient` (stdlib asyncio) and print one JSON document on stdout.

``streams``: opens every connection first (connecting is not measured), then starts the streamed
chat requests evenly over ``--ramp`` seconds (0.5: with 1 s streams, all of them are open at once
for half a second; 0: a single burst, which measures queueing of the whole burst instead) and
records, per content event, when it arrived
(``time.monotonic_ns()``) and when the fake backend wrote it (its ``"sent_ns"``; the monotonic
clock is shared by all processes of a machine). From these: first-byte latency (request written →
first content event), gaps between consecutive events of a stream, delivery delay (written by the
backend → read by the client) and, per stream, the arrival spread over the send spread — about 1
when events flow through as they are produced, near 0 when something buffered them into a burst.

    python -m bench.load streams --url http://127.0.0.1:8000 --api-key K --streams 500 --events 50
    python -m bench.load plain --url http://127.0.0.1:8000 --api-key K --connections 64 -d 10
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from llamaproxy.cli.benchclient import BenchHTTPError, Connection, Target
from llamaproxy.cli.benchreport import summarize

PATH = "/v1/chat/completions"
PLAIN_BODY = json.dumps({
    "model": "fake", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16,
}).encode()
_SENT_NS = re.compile(rb'"sent_ns":(\d+)')
#: Connections opened at once while setting up (the gateway's listen backlog is small).
CONNECT_BATCH = 50


def stream_body(events: int) -> bytes:
    """A streamed chat request asking the fake backend for ``events`` content events."""
    return json.dumps({
        "model": "fake", "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": events, "stream": True,
    }).encode()


@dataclass
class StreamTrace:
    """What one stream looked like from the client."""

    sent_ns: int = 0
    arrivals: list[int] = field(default_factory=list)
    produced: list[int] = field(default_factory=list)
    error: str | None = None


class StreamProbe(asyncio.Protocol):
    """One streamed request on its own connection, read as raw bytes: no HTTP or SSE decoding
    beyond the status line, so that the client stays cheap at tens of thousands of events/s.

    Each ``"sent_ns":<n>`` in the bytes is one content event; events read by the same
    ``data_received`` share its arrival time (they did arrive together). The stream ends with
    the response (the last chunk, or the server closing: the request says ``Connection:
    close``) after ``data: [DONE]``; closing at ``[DONE]`` itself would race the proxy's own
    end of the exchange, which a real client does not do.
    """

    def __init__(self) -> None:
        self.trace = StreamTrace()
        self.done: asyncio.Future[StreamTrace] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self._head_checked = False
        self._tail = b""
        self._saw_done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, request: bytes) -> None:
        """Write the request; the clock starts here."""
        assert self.transport is not None
        self.trace.sent_ns = time.monotonic_ns()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buffer = self._tail + data if self._tail else data
        if not self._head_checked:
            if b"\r\n" not in buffer:
                self._tail = buffer
                return
            self._head_checked = True
            status_line = buffer[:buffer.index(b"\r\n")]
            if not status_line.startswith(b"HTTP/1.1 200"):
                self._finish(f"{status_line[:60]!r}: {buffer[-120:]!r}")
                return
        trace = self.trace
        position = 0
        for match in _SENT_NS.finditer(buffer):
            trace.arrivals.append(now)
            trace.produced.append(int(match[1]))
            position = match.end()
        if b"data: [DONE]" in buffer:
            self._saw_done = True
        if self._saw_done and buffer.endswith(b"\r\n0\r\n\r\n"):
            self._finish(None)
            return
        # Keep what may hold a pattern cut in two (a whole event is far shorter than 512 bytes).
        self._tail = buffer[max(position, len(buffer) - 512):]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self._finish(None if self._saw_done else f"connection lost: {exc}")

    def _finish(self, error: str | None) -> None:
        self.trace.error = error
        if not self.done.done():
            self.done.set_result(self.trace)
        if self.transport is not None:
            self.transport.close()


class Concurrency:
    """Streams in progress, and the most there ever were at once."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def enter(self) -> None:
        """A stream started."""
        self.now += 1
        self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        """A stream ended."""
        self.now -= 1


def stream_request(target: Target, events: int) -> bytes:
    """The raw HTTP/1.1 request of one stream."""
    body = stream_body(events)
    headers = [
        f"POST {target.base_path}{PATH} HTTP/1.1", f"Host: {target.host_header}",
        "Content-Type: application/json", f"Content-Length: {len(body)}", "Connection: close",
    ]
    if target.api_key:
        headers.append(f"Authorization: Bearer {target.api_key}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


async def _one_stream(
    probe: StreamProbe, request: bytes, start_at: float, active: Concurrency, timeout: float
) -> StreamTrace:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start_at - loop.time()))
    active.enter()
    try:
        probe.send(request)
        async with asyncio.timeout(timeout):
            return await probe.done
    except TimeoutError:
        probe.trace.error = "timeout"
        if probe.transport is not None:
            probe.transport.close()
        return probe.trace
    finally:
        active.leave()


async def _connect(target: Target) -> StreamProbe:
    loop = asyncio.get_running_loop()
    _, probe = await loop.create_connection(StreamProbe, target.host, target.port)
    return probe


async def run_streams(
    target: Target, streams: int, events: int, ramp: float, timeout: float
) -> dict[str, Any]:
    """``streams`` streams of ``events`` events, started evenly over ``ramp`` seconds (0: all
    at once); the summary document."""
    if target.scheme != "http":
        raise ValueError("the stream load speaks plain http only")
    probes: list[StreamProbe] = []
    for first in range(0, streams, CONNECT_BATCH):
        batch = min(CONNECT_BATCH, streams - first)
        probes += await asyncio.gather(*(_connect(target) for _ in range(batch)))
    loop = asyncio.get_running_loop()
    request = stream_request(target, events)
    active = Concurrency()
    begin = loop.time() + 0.05
    step = ramp / streams
    started = time.monotonic_ns() + 50_000_000
    traces = await asyncio.gather(*(
        _one_stream(p, request, begin + i * step, active, timeout) for i, p in enumerate(probes)
    ))
    wall = (time.monotonic_ns() - started) / 1e9
    result = summarize_streams(list(traces), events, wall)
    result["ramp_s"] = ramp
    result["peak_concurrent"] = active.peak
    return result


def summarize_streams(traces: list[StreamTrace], events: int, wall: float) -> dict[str, Any]:
    """Statistics (ms) over every stream's trace."""
    first_byte, gaps, delivery, spread = [], [], [], []
    complete = 0
    errors: list[str] = []
    for trace in traces:
        if trace.error is not None:
            if len(errors) < 5 and trace.error not in errors:
                errors.append(trace.error)
            continue
        arrivals, produced = trace.arrivals, trace.produced
        if len(arrivals) == events:
            complete += 1
        if not arrivals:
            continue
        first_byte.append((arrivals[0] - trace.sent_ns) / 1e6)
        gaps.extend((b - a) / 1e6 for a, b in itertools.pairwise(arrivals))
        delivery.extend((a - p) / 1e6 for a, p in zip(arrivals, produced, strict=True))
        if len(arrivals) > 1 and produced[-1] > produced[0]:
            spread.append((arrivals[-1] - arrivals[0]) / (produced[-1] - produced[0]))
    return {
        "streams": len(traces),
        "complete": complete,
        "failed": sum(1 for t in traces if t.error is not None),
        "events_per_stream": events,
        "events_received": sum(len(t.arrivals) for t in traces),
        "wall_s": wall,
        "first_byte_ms": summarize(first_byte),
        "gap_ms": summarize(gaps),
        "delivery_ms": summarize(delivery),
        "spread_ratio": summarize(spread),
        "errors": errors,
    }


async def run_plain(
    target: Target, connections: int, duration: float, body: bytes
) -> dict[str, Any]:
    """A closed loop of POSTs on ``connections`` keep-alive connections for ``duration`` s."""
    latencies: list[float] = []
    errors: list[str] = []
    failed = 0
    pool = [Connection(target, 10.0, 30.0) for _ in range(connections)]
    for first in range(0, connections, CONNECT_BATCH):
        await asyncio.gather(*(c.open() for c in pool[first:first + CONNECT_BATCH]))

    async def worker(connection: Connection, until: float) -> None:
        nonlocal failed
        while time.perf_counter() < until:
            try:
                async with connection.deadline():
                    sent = await connection.send("POST", PATH, body)
                    response = await connection.read_head("POST")
                    await connection.read_body(response, 0)
                ok = 200 <= response.status < 300
                if not ok and len(errors) < 5:
                    errors.append(f"HTTP {response.status}")
            except (OSError, TimeoutError, BenchHTTPError) as e:
                ok = False
                if len(errors) < 5:
                    errors.append(f"{type(e).__name__}: {e}")
            if ok:
                latencies.append(time.perf_counter() - sent)
            else:
                failed += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(c, started + duration) for c in pool))
    wall = time.perf_counter() - started
    for connection in pool:
        await connection.close()
    return {
        "tool": "python",
        "requests": len(latencies),
        "errors": failed,
        "duration_s": wall,
        "rps": len(latencies) / wall,
        "latency_ms": summarize(latencies, 1000),
        "error_samples": errors,
    }


def main() -> None:
    """Command line: ``streams`` or ``plain``; prints one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("streams", "plain"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--api-key")
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--ramp", type=float, default=0.5,
                        help="seconds over which the streams start (0: all at once)")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("-d", "--duration", type=float, default=10.0)
    args = parser.parse_args()
    target = Target.from_url(args.url, args.api_key)
    if args.mode == "streams":
        result = asyncio.run(
            run_streams(target, args.streams, args.events, args.ramp, args.timeout)
        )
    else:
        result = asyncio.run(run_plain(target, args.connections, args.duration, PLAIN_BODY))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
