"""10 000 queued requests on a real gateway: what they add to its resident memory.

``bench/queue_cost.py`` measures the queue in memory (Python allocations, in-memory clients). This
is the same question asked of the real thing: ``twistd llamaproxy`` (every feature on, as in
:mod:`bench.overhead`) with one inference slot, held by a long stream from the fake backend, and
N clients on real sockets each sending a chat request that waits in the queue. Reported: the
gateway's RSS before and with the N requests queued (``/health`` ``queue.waiting`` = N), and the
difference per queued request.

    .venv/bin/python -m bench.queue_rss [-n 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.overhead import API_KEY, PATH, Plan, gateway_env, start_backend
from bench.procs import Process, free_port, http_status, memory_kib, venv_script, wait_until

_BODY = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}]}).encode()


def _request(port: int, body: bytes) -> bytes:
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _waiting(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
        return int(json.load(answer)["queue"]["waiting"])


async def _queue(port: int, n: int) -> list[asyncio.StreamWriter]:
    """The long stream that holds the slot, then ``n`` queued requests; their writers."""
    hog_body = json.dumps({"model": "fake", "messages": [], "stream": True,
                           "max_tokens": 100_000}).encode()
    _, hog = await asyncio.open_connection("127.0.0.1", port)
    hog.write(_request(port, hog_body))
    writers = [hog]
    await asyncio.sleep(0.5)
    request = _request(port, _BODY)
    for first in range(0, n, 200):
        batch = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port)
                                       for _ in range(min(200, n - first))))
        for _, writer in batch:
            writer.write(request)
            writers.append(writer)
        await asyncio.sleep(0)
    return writers


def measure(root: Path, backend_url: str, n: int, extra_env: dict[str, str] | None = None,
            name: str = "llamaproxy") -> dict[str, Any]:
    """Start a one-slot gateway in front of ``backend_url``, queue ``n`` requests on real
    sockets, and return its RSS idle and with them waiting (MB), how many waited, and the cost
    per queued request (KiB). ``extra_env`` overrides the gateway's environment (FAST_PATHS)."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**gateway_env(root, port, backend_url), "MAX_CONCURRENT_REQUESTS": "1",
           "MAX_QUEUE_SIZE": str(n + 100), "QUEUE_TIMEOUT": "600",
           "CLIENT_HEADER_TIMEOUT": "600", **(extra_env or {})}
    command = ["prlimit", f"--nofile={n + 1000}", venv_script("twistd"), "-n",
               "--pidfile=", "--logfile", str(root / "twistd.log"), "llamaproxy"]
    gateway = Process(name, command, root / "twistd.out", env=env, cwd=root)
    try:
        wait_until(lambda: http_status(port, "/readyz") == 200, 30, name, gateway)
        pids = [gateway.pid]  # prlimit execs twistd: same process
        time.sleep(1)
        before = memory_kib(pids)

        async def run() -> dict[str, Any]:
            writers = await _queue(port, n)
            try:
                deadline = time.monotonic() + 120
                while _waiting(port) < n and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                waiting = _waiting(port)
                await asyncio.sleep(1)
                after = memory_kib(pids)
            finally:
                for writer in writers:
                    writer.transport.abort()
            return {"requested": n, "waiting": waiting, "rss_before_mb": before * 1024 / 1e6,
                    "rss_mb": after * 1024 / 1e6,
                    "kib_per_request": (after - before) / max(waiting, 1)}

        return asyncio.run(run())
    finally:
        gateway.stop()


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10_000, help="queued requests")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="llamaproxy-queue-"))
    backend = start_backend(root, Plan(events=50, interval_ms=100.0), None)
    try:
        result = measure(root, backend.url, args.n)
    finally:
        backend.process.stop()
    before, after = result["rss_before_mb"], result["rss_mb"]
    print(f"{result['waiting']} requests queued on real sockets: gateway RSS {before:.1f} MB"
          f" → {after:.1f} MB, {result['kib_per_request']:.1f} KiB per queued request "
          f"({after - before:.1f} MB for all)")


if __name__ == "__main__":
    main()
