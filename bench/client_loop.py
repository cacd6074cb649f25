"""The backend client's own cost per exchange, on a fixed in-memory loop (no sockets, no reactor).

``BackendClient`` sends a request on a pooled connection whose transport only records writes, is
given a response in the reads a backend would send, and the body is read to its end; the loop
repeats that. Two kinds of exchange:

- ``json``: a plain chat answer, a llama-server-like head (five fields) and a 600-byte body
  with Content-Length, in one read;
- ``stream``: a streamed answer, the head and the first event in one read, then 20 events as
  one whole chunk per read, then the last event and the end of the body together.

On a shared machine wall-clock numbers move with the neighbours; run it under
``valgrind --tool=callgrind`` with two loop lengths and take the difference per exchange
(``--callgrind``), which counts instructions and is stable from run to run:

    .venv/bin/python -m bench.client_loop [--exchanges 20000]
    .venv/bin/python -m bench.client_loop --callgrind [--exchanges 2000]

Used for issue 18's A/B (docs/performance.md): it runs against any checkout that has
``llamaproxy.fastpath.backend_client`` (``PYTHONPATH=<checkout>``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock

from llamaproxy.backends.forward import BytesBody
from llamaproxy.fastpath.backend_client import BackendClient

URL = b"http://127.0.0.1:8080/v1/chat/completions"
REQUEST_BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
JSON_BODY = (
    b'{"choices":[{"index":0,"message":{"role":"assistant","content":"' + b"x" * 520 + b'"}}]}'
)
HEAD = (
    b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: \r\nContent-Length: %d\r\n"
    b"Content-Type: application/json; charset=utf-8\r\nKeep-Alive: timeout=5, max=100\r\n"
    b"Server: llama.cpp\r\n\r\n"
)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: \r\nContent-Type: text/event-stream\r\n"
    b"Keep-Alive: timeout=5, max=100\r\nServer: llama.cpp\r\nTransfer-Encoding: chunked\r\n\r\n"
)
EVENT = (
    b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}],'
    b'"object":"chat.completion.chunk"}\n\n'
)
CHUNK = b"%x\r\n%b\r\n" % (len(EVENT), EVENT)


class _Transport:
    """What a connection writes to: records nothing, pauses nothing."""

    disconnecting = False

    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, data: list[bytes]) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def loseConnection(self) -> None:
        raise AssertionError("the loop's connection must stay open")

    abortConnection = loseConnection


class _Endpoint:
    def __init__(self) -> None:
        self.protocols: list[Any] = []

    def connect(self, factory: Any) -> Any:
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(_Transport())
        self.protocols.append(protocol)
        return succeed(protocol)

    def endpointForURI(self, uri: Any) -> _Endpoint:
        return self


class _Body(Protocol):
    def __init__(self) -> None:
        self.size = 0
        self.ended = False

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)

    def connectionLost(self, reason: object = None) -> None:
        self.ended = True


def _reads(kind: str) -> list[bytes]:
    if kind == "json":
        return [HEAD % len(JSON_BODY) + JSON_BODY]
    return [STREAM_HEAD + CHUNK] + [CHUNK] * 20 + [CHUNK + b"0\r\n\r\n"]


def run(kind: str, exchanges: int) -> float:
    """Run ``exchanges`` exchanges; the process CPU seconds they took."""
    endpoint = _Endpoint()
    client = BackendClient(Clock(), endpoint, 4)  # type: ignore[arg-type]
    reads = _reads(kind)
    expected = len(JSON_BODY) if kind == "json" else len(EVENT) * 22
    started = time.process_time()
    for _ in range(exchanges):
        results: list[Any] = []
        client.request(b"POST", URL, None, BytesBody(REQUEST_BODY)).addCallback(results.append)
        connection = endpoint.protocols[-1]
        body = _Body()
        for i, data in enumerate(reads):
            connection.dataReceived(data)
            if i == 0:
                results[0].deliverBody(body)
        if not body.ended or body.size != expected:
            raise AssertionError(f"exchange went wrong: {body.size} of {expected} bytes")
    elapsed = time.process_time() - started
    if len(endpoint.protocols) != 1:
        raise AssertionError("the connection was not reused")
    return elapsed


def _instructions(kind: str, exchanges: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             sys.executable, "-m", "bench.client_loop", "--kind", kind,
             "--exchanges", str(exchanges)],
            check=True, capture_output=True,
        )
        with open(out) as f:
            return int(re.search(r"^summary: (\d+)", f.read(), re.M).group(1))  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=20000)
    parser.add_argument("--kind", choices=("json", "stream", "both"), default="both")
    parser.add_argument("--callgrind", action="store_true",
                        help="instructions per exchange: (Ir(2n) - Ir(n)) / n under callgrind")
    args = parser.parse_args()
    kinds = ("json", "stream") if args.kind == "both" else (args.kind,)
    for kind in kinds:
        if args.callgrind:
            n = args.exchanges
            per = (_instructions(kind, 2 * n) - _instructions(kind, n)) / n
            print(f"{kind}: {per:,.0f} instructions per exchange (callgrind, n={n})")
        else:
            run(kind, min(args.exchanges, 1000))  # warm up
            seconds = run(kind, args.exchanges)
            print(f"{kind}: {seconds / args.exchanges * 1e6:.2f} µs CPU per exchange")


if __name__ == "__main__":
    main()
