"""What hostile JSON bodies from one key cost the gateway: its memory, and everyone else's latency.

The real ``twistd llamaproxy`` (every feature on, as in :mod:`bench.overhead`) in front of the fake
backend, with its 2 slots held by two long streams, so bodies that pass their checks wait in the
queue, as in issue 15's observation. While each mix of bodies below arrives at once over raw
sockets, a client pings ``/ping`` on its own keep-alive connection every 10 ms; reported per mix:
the pings' p50/p99/max, the gateway's RSS before, at its peak and after, and the statuses.

- ``empty objects``: 10 MB of ``[{},{},…]`` (3.4 million objects) in a chat body;
- ``deep``: ``[`` x 10 000 (a RecursionError before);
- ``at the limit``: valid bodies of 10 MB holding just under ``MAX_JSON_VALUES`` strings;
- ``one long prompt``: a 10 MB message (the legitimate large body).

    .venv/bin/python -m bench.adversarial_body [--bodies 4] [--pythonpath OLD_CHECKOUT]

``--pythonpath`` runs another checkout's gateway (e.g. a ``git worktree`` of an older commit)
with the same harness: the before and after of a change, side by side.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.overhead import API_KEY, PATH, Plan, gateway_env, start_backend
from bench.procs import Process, free_port, http_status, memory_kib, venv_script, wait_until

_CHAT = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "x": '


def mixes() -> dict[str, bytes]:
    """The hostile (and one legitimate) bodies, each under the 10 MiB body limit."""
    at_limit = [f"v{i:06d}".encode() * 6 for i in range(190_000)]
    return {
        "empty objects": _CHAT + b"[" + b",".join([b"{}"] * 3_400_000) + b"]}",
        "deep": b'{"messages":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        "at the limit": _CHAT + b'["' + b'","'.join(at_limit) + b'"]}',
        "one long prompt": b'{"messages": [{"role": "user", "content": "'
        + b"hello, world. " * 700_000 + b'"}], "max_tokens": 1}',
    }


def _post(port: int, body: bytes, results: list[int]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(
            f"POST {PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        s.settimeout(5)  # a queued body waits for a slot: its status is all we need, or none
        try:
            head = s.recv(64)
            results.append(int(head.split(b" ", 2)[1]) if head else 0)
        except (TimeoutError, OSError):
            results.append(-1)  # still waiting in the queue


class Pinger(threading.Thread):
    """GET /ping every 10 ms on one keep-alive connection; the latencies in ms."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            request = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"
            while not self.stop.is_set():
                started = time.perf_counter()
                s.sendall(request)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += s.recv(4096)
                self.latencies.append((time.perf_counter() - started) * 1000)
                time.sleep(0.01)


def run_mix(port: int, pid: int, body: bytes, count: int) -> dict[str, object]:
    """Send ``count`` copies of ``body`` at once while pinging; the figures."""
    time.sleep(0.5)
    before = memory_kib([pid])
    pinger = Pinger(port)
    pinger.start()
    time.sleep(0.3)
    statuses: list[int] = []
    senders = [threading.Thread(target=_post, args=(port, body, statuses)) for _ in range(count)]
    peak = before
    for sender in senders:
        sender.start()
    while any(sender.is_alive() for sender in senders):
        peak = max(peak, memory_kib([pid]))
        time.sleep(0.01)
    time.sleep(0.3)
    pinger.stop.set()
    pinger.join()
    latencies = sorted(pinger.latencies)
    return {
        "ping_p50_ms": round(statistics.median(latencies), 2),
        "ping_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2),
        "ping_max_ms": round(latencies[-1], 2),
        "pings": len(latencies),
        "rss_before_mb": round(before / 1024, 1),
        "rss_peak_mb": round(peak / 1024, 1),
        "rss_after_mb": round(memory_kib([pid]) / 1024, 1),
        "statuses": sorted(statuses),
    }


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bodies", type=int, default=4, help="bodies of each mix sent at once")
    parser.add_argument("--pythonpath", help="run the gateway from this checkout instead")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="llamaproxy-adversarial-"))
    backend = start_backend(root, Plan(events=100_000, interval_ms=50.0), None)
    port = free_port()
    env = {**gateway_env(root, port, backend.url), "MAX_CONCURRENT_REQUESTS": "2",
           "QUEUE_TIMEOUT": "600", "MAX_REQUESTS_PER_MINUTE": "100000"}
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    gateway = Process("llamaproxy", [venv_script("twistd"), "-n", "--pidfile=", "--logfile",
                                     str(root / "twistd.log"), "llamaproxy"],
                      root / "twistd.out", env=env, cwd=root)
    hogs: list[socket.socket] = []
    try:
        wait_until(lambda: http_status(port, "/readyz") == 200, 30, "llamaproxy", gateway)
        hog = json.dumps({"messages": [], "stream": True}).encode()
        for _ in range(2):  # the two slots, held for the whole run
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                      f"Content-Length: {len(hog)}\r\n\r\n".encode() + hog)
            hogs.append(s)
        print(f"gateway from {args.pythonpath or 'this checkout'}; {args.bodies} bodies per mix, "
              "2 slots held")
        for name, body in mixes().items():
            figures = run_mix(port, gateway.pid, body, args.bodies)
            print(f"{name:16} ({len(body) / 1e6:4.1f} MB) {json.dumps(figures)}", flush=True)
    finally:
        for s in hogs:
            s.close()
        gateway.stop()
        backend.process.stop()


if __name__ == "__main__":
    main()
