"""Instructions per request and per streamed event, counted by valgrind: an A/B that a busy
machine cannot blur.

Seconds measured on a shared 2-core machine move by 20-50 % from run to run (other work, CPU
frequency, the other core's load); valgrind's callgrind counts the instructions a process
executes, which do not depend on what else the machine does. That makes it the judge of "does
this change cost per-request work", one change at a time, where wall-clock runs need a quiet
machine and many rounds. It says nothing about latency, memory or parallelism: the overhead
harness (:mod:`bench.overhead`) measures those.

For each server (llamaproxy with ``FAST_PATHS=auto``, with ``off``, every feature on as in the
overhead harness; older checkouts with ``--pythonpath``; the older gateway with
``--older-gateway``), the harness runs it three times under ``valgrind --tool=callgrind``, each
a whole life (start, warm-up requests, the load, a graceful stop): with no load, with
``--requests`` plain chat requests one after another on one keep-alive connection (a fresh
connection per request for servers that close it), and with ``--streams`` streams of
``--events`` events. The differences of the totals, outside CPython's cyclic collector (whose
timed full collections fall differently in each life), are the instructions per request and per
stream; the collector's share is reported apart. (``callgrind_control`` could count one
phase of one life, but it did not reach the servers on this machine.) Python's hash seed is
fixed, so two lives of the same server differ only by timers.

    .venv/bin/python -m bench.instructions [--requests 300] [--streams 20] [--events 20]
        [--pythonpath OLD_CHECKOUT ...] [--older-gateway PATH] [--json out.json]

Under valgrind a Python process runs ~50x slower: the run takes a few minutes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import older_gateway
from bench.load import PLAIN_BODY, stream_body
from bench.overhead import API_KEY, Plan, gateway_env, start_backend
from bench.procs import Process, free_port, http_status, venv_script, wait_until

#: Plain requests and streams every life of a server starts with (imports, caches, pools).
WARM_UP = 20
_TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


@dataclass
class Counted:
    """A server running under callgrind."""

    name: str
    port: int
    process: Process
    out_dir: Path
    #: Whether it keeps a connection open between requests.
    keep_alive: bool = True

    def stop(self) -> tuple[int, int]:
        """Stop it (SIGTERM: a graceful stop); return the instructions it executed, and those
        of them spent in the cyclic garbage collector."""
        self.process.stop(300)
        for path in self.out_dir.glob("callgrind.out.*"):
            match = _TOTALS.search(path.read_text(errors="replace"))
            if match:
                return int(match.group(1)), collector_instructions(path)
        raise RuntimeError(f"{self.name}: no callgrind totals in {self.out_dir}")


def collector_instructions(path: Path) -> int:
    """Instructions spent in CPython's cyclic collector (inclusive), from a callgrind file.

    Counted apart because when full collections happen depends on the clock (the fast paths'
    GC schedule runs one every 60 s), not on the work: two lives of the same server differ by
    tens of millions of instructions there, and by little elsewhere."""
    output = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(path)],
        capture_output=True, text=True, check=True).stdout
    for line in output.splitlines():
        if line.rstrip().endswith("]") and "gcmodule.c:gc_collect_main " in line:
            return int(line.split()[0].replace(",", ""))
    return 0


def _valgrind(out_dir: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/callgrind.out.%p"]


def start_llamaproxy(root: Path, backend_url: str, fast_paths: str, pythonpath: str | None,
                     name: str) -> Counted:
    """``twistd -n llamaproxy`` under callgrind, every feature on."""
    run = root / name
    run.mkdir(parents=True)
    port = free_port()
    env = gateway_env(run, port, backend_url, fast_paths)
    python = sys.executable
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    command = [*_valgrind(run), python, venv_script("twistd"), "-n", "--pidfile=",
               "--logfile", str(run / "twistd.log"), "llamaproxy"]
    process = Process(name, command, run / "twistd.out", env=env, cwd=pythonpath or run)
    wait_until(lambda: http_status(port, "/readyz", timeout=10) == 200, 600,
               f"{name} /readyz", process)
    return Counted(name, port, process, run)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def start_older(run: Path, export: Path, backend_port: int) -> Counted:
    """The older gateway (:mod:`bench.older_gateway`) under callgrind."""
    process, port, _ = older_gateway.start(export, run, backend_port, API_KEY, sys.executable,
                                           None, wrapper=_valgrind(run), ready_timeout=600)
    return Counted("older gateway", port, process, run, keep_alive=False)


def _headers(stream: bool) -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
            "Accept": "text/event-stream" if stream else "application/json"}


def plain_requests(server: Counted, count: int) -> None:
    """``count`` chat requests, one after another."""
    connection: http.client.HTTPConnection | None = None
    for _ in range(count):
        if connection is None:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        connection.request("POST", "/v1/chat/completions", PLAIN_BODY, _headers(False))
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{server.name}: HTTP {response.status}")
        if not server.keep_alive or response.getheader("connection", "").lower() == "close":
            connection.close()
            connection = None
    if connection is not None:
        connection.close()


def streams(server: Counted, count: int, events: int) -> int:
    """``count`` streams of ``events`` events, one after another; returns the events seen."""
    seen = 0
    for _ in range(count):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        connection.request("POST", "/v1/chat/completions", stream_body(events), _headers(True))
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"{server.name}: HTTP {response.status}")
        seen += body.count(b"data: {")
        connection.close()
    return seen


def counted_run(start: Callable[[str], Counted], label: str, requests: int,
                stream_count: int, events: int) -> tuple[int, int]:
    """Instructions of one whole life of a server: start, warm-up, the load, graceful stop."""
    server = start(label)
    try:
        plain_requests(server, WARM_UP + requests)
        streams(server, 1 + stream_count, events)
    except BaseException:
        server.process.stop(30)
        raise
    return server.stop()


def measure(start: Callable[[str], Counted], requests: int, stream_count: int,
            events: int) -> dict[str, Any]:
    """Three lives of the server: the warm-up only, plus ``requests`` plain requests, plus
    ``stream_count`` streams; the differences are the per-request and per-stream counts."""
    base, base_gc = counted_run(start, "base", 0, 0, events)
    plain, plain_gc = counted_run(start, "plain", requests, 0, events)
    streamed, streamed_gc = counted_run(start, "streams", 0, stream_count, events)
    return {
        "requests": requests, "streams": stream_count, "events": events,
        "instructions_per_request": ((plain - plain_gc) - (base - base_gc)) / requests,
        "instructions_per_stream": ((streamed - streamed_gc) - (base - base_gc)) / stream_count,
        "collector_per_request": (plain_gc - base_gc) / requests,
        "collector_per_stream": (streamed_gc - base_gc) / stream_count,
        "instructions_base": base, "collector_base": base_gc,
    }


def markdown(results: dict[str, dict[str, Any]]) -> str:
    """The table, each server's counts also as a ratio to the first's."""
    names = list(results)
    first = results[names[0]]
    lines = ["| | M instructions per plain request | ratio | M instructions per stream "
             f"({first['events']} events) | ratio | collector per request / stream (M) |",
             "|---|---|---|---|---|---|"]
    for name in names:
        row = results[name]
        lines.append(
            f"| {name} | {row['instructions_per_request'] / 1e6:.2f} | "
            f"{row['instructions_per_request'] / first['instructions_per_request']:.2f} | "
            f"{row['instructions_per_stream'] / 1e6:.2f} | "
            f"{row['instructions_per_stream'] / first['instructions_per_stream']:.2f} | "
            f"{row.get('collector_per_request', 0) / 1e6:.2f} / "
            f"{row.get('collector_per_stream', 0) / 1e6:.2f} |")
    return ("\n".join(lines) + "\n\nInstructions outside CPython's cyclic collector; the "
            "collector's own share depends on when timed full collections fell (see "
            "collector_instructions) and is shown apart.\n")


def main() -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--pythonpath", action="append", default=[], metavar="CHECKOUT",
                        help="also count an older checkout's llamaproxy (FAST_PATHS=auto)")
    parser.add_argument("--older-gateway", type=Path,
                        default=os.environ.get("BENCH_OLDER_GATEWAY") or None,
                        help="also count the older gateway from this export")
    parser.add_argument("--no-off", action="store_true", help="skip FAST_PATHS=off")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    os.environ["PYTHONHASHSEED"] = "0"  # (the servers inherit it)
    root = Path(tempfile.mkdtemp(prefix="llamaproxy-instructions-"))
    plan = Plan(events=args.events, interval_ms=0.0)
    backend = start_backend(root, plan, None)
    results: dict[str, dict[str, Any]] = {}
    wanted: list[tuple[str, str, str | None]] = [("llamaproxy (auto)", "auto", None)]
    if not args.no_off:
        wanted.append(("llamaproxy (off)", "off", None))
    wanted += [(f"llamaproxy {Path(p).name} (auto)", "auto", p) for p in args.pythonpath]
    try:
        for name, fast_paths, pythonpath in wanted:
            def gateway(label: str, fast_paths: str = fast_paths,
                        pythonpath: str | None = pythonpath, name: str = name) -> Counted:
                return start_llamaproxy(root, backend.url, fast_paths, pythonpath,
                                        f"{_slug(name)}-{label}")
            results[name] = measure(gateway, args.requests, args.streams, args.events)
            print(name, results[name], flush=True)
        if args.older_gateway is not None:
            port = int(backend.url.rsplit(":", 1)[1])

            def older(label: str) -> Counted:
                return start_older(root / f"older-{label}", args.older_gateway, port)
            results["older gateway"] = measure(older, args.requests, args.streams, args.events)
    finally:
        backend.process.stop()
    text = markdown(results)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
