"""``llamaproxy bench``: measure a gateway (or any OpenAI-compatible server), optionally against a
second URL (typically the backend itself) under the same load, interleaved request by request.

The options and the numbers are the older gateway's ``scripts/benchmark.py``: sequential
``GET /ping`` and ``GET /health`` (the gateway's own overhead), then streamed chat completions
under a concurrency limit, with TTFT (write of the request → first non-empty ``delta.content``),
total latency and tokens/s per request, summarised as min/mean/p50/p95/p99/max (nearest rank).
Tokens are the stream's ``usage.completion_tokens`` (asked for with
``stream_options.include_usage``), else the number of content deltas. The client is
:mod:`llamaproxy.cli.benchclient` (stdlib asyncio, no extra dependency); no reactor is started.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from collections.abc import Sequence
from typing import TextIO

from llamaproxy.cli.benchclient import (
    Connection,
    Target,
    chat_body,
    timed_chat_stream,
    timed_get,
)
from llamaproxy.cli.benchreport import (
    DEFAULT_PROMPT,
    BenchSettings,
    TargetRun,
    build_report,
    failures,
    render_text,
)

OVERHEAD_PATHS = ("/ping", "/health")
#: Seconds between two redraws of the progress bar.
PROGRESS_EVERY = 0.1


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bench`` to the top-level parser."""
    parser = commands.add_parser(
        "bench",
        help="measure latency, TTFT and throughput of a gateway (optionally vs its backend)",
        description="Measure a running gateway: sequential GET /ping and /health, then streamed "
        "chat completions (TTFT, latency, tokens/s; min/mean/p50/p95/p99/max, nearest rank). "
        "With --compare, the same load goes to a second URL (e.g. the backend itself), "
        "interleaved request by request, and the latency the first URL adds is reported.",
    )
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer <key>")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="user message to send")
    parser.add_argument("--model", default="default", help="model field of the request")
    parser.add_argument("--max-tokens", type=_positive, default=128)
    parser.add_argument("--concurrency", type=_positive, default=1,
                        help="requests in flight at once")
    parser.add_argument("--requests", type=_positive, default=10,
                        help="measured requests per URL (also the GET count per path)")
    parser.add_argument("--warmup", type=_non_negative, default=1,
                        help="sequential requests per URL and series, not measured")
    parser.add_argument("--output", choices=("text", "json"), default="text")
    parser.add_argument("--gateway-only", action="store_true",
                        help="only the sequential GET /ping and /health overhead")
    parser.add_argument("--compare", metavar="URL",
                        help="second URL given the same load, interleaved request by request")
    parser.add_argument("--compare-api-key", help="API key for --compare")
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="seconds")
    parser.add_argument("--read-timeout", type=float, default=120.0,
                        help="seconds without a byte before a request fails")
    parser.add_argument("--progress", action="store_true",
                        help="progress bar on stderr even when it is not a terminal")
    parser.set_defaults(handler=run_bench, help_parser=parser)


class Progress:
    """A one-line progress bar on a stream (a no-op when disabled)."""

    def __init__(self, stream: TextIO, total: int, enabled: bool, width: int = 30) -> None:
        self.stream = stream
        self.total = max(1, total)
        self.enabled = enabled
        self.width = width
        self.done = 0
        self.started = time.monotonic()
        self._drawn = 0.0

    def advance(self, count: int = 1) -> None:
        """Count finished requests; redraw at most every PROGRESS_EVERY seconds."""
        self.done += count
        if self.enabled:
            now = time.monotonic()
            if now - self._drawn >= PROGRESS_EVERY or self.done >= self.total:
                self._drawn = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        filled = min(self.width, self.width * self.done // self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(
            f"\r[{bar}] {self.done}/{self.total} requests, {now - self.started:.1f} s"
        )
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()


def _ordered(runs: Sequence[TargetRun], index: int) -> Sequence[TargetRun]:
    """Request ``index`` goes to every URL; who goes first alternates (no ordering bias)."""
    return runs if index % 2 == 0 else list(reversed(runs))


async def measure_overhead(
    runs: Sequence[TargetRun], settings: BenchSettings, progress: Progress
) -> None:
    """Sequential GETs of /ping and /health on each URL, interleaved; warm-up discarded."""
    connections = [
        Connection(run.target, settings.connect_timeout, settings.read_timeout) for run in runs
    ]
    by_run = dict(zip((id(run) for run in runs), connections, strict=True))
    try:
        for path in OVERHEAD_PATHS:
            for run, connection in zip(runs, connections, strict=True):
                for _ in range(settings.warmup):
                    await timed_get(connection, path)
                run.gets[path] = []
            for index in range(settings.requests):
                for run in _ordered(runs, index):
                    run.gets[path].append(await timed_get(by_run[id(run)], path))
                    progress.advance()
    finally:
        for connection in connections:
            await connection.close()


async def measure_inference(
    runs: Sequence[TargetRun], settings: BenchSettings, progress: Progress
) -> float:
    """Streamed chat completions: sequential warm-up, then ``requests`` per URL with at most
    ``concurrency`` workers, each sending request i to every URL in turn; returns wall seconds
    of the measured part."""
    body = chat_body(settings.prompt, settings.max_tokens, settings.model)
    for run in runs:
        connection = Connection(run.target, settings.connect_timeout, settings.read_timeout)
        try:
            for _ in range(settings.warmup):
                await timed_chat_stream(connection, body)
        finally:
            await connection.close()

    counter = itertools.count()

    async def worker() -> None:
        connections = {
            id(run): Connection(run.target, settings.connect_timeout, settings.read_timeout)
            for run in runs
        }
        try:
            while (index := next(counter)) < settings.requests:
                for run in _ordered(runs, index):
                    run.streams.append(await timed_chat_stream(connections[id(run)], body))
                    progress.advance()
        finally:
            for connection in connections.values():
                await connection.close()

    started = time.perf_counter()
    workers = min(settings.concurrency, settings.requests)
    await asyncio.gather(*(worker() for _ in range(workers)))
    return time.perf_counter() - started


async def run_all(
    runs: Sequence[TargetRun], settings: BenchSettings, progress: Progress
) -> float | None:
    """The overhead series, then (unless gateway-only) the inference load; the load's wall
    time in seconds (None when gateway-only)."""
    await measure_overhead(runs, settings, progress)
    if settings.gateway_only:
        return None
    return await measure_inference(runs, settings, progress)


def run_bench(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    """The ``bench`` handler: run, print the report, exit 1 if a URL never succeeded."""
    try:
        targets = [Target.from_url(args.url, args.api_key)]
        if args.compare:
            targets.append(Target.from_url(args.compare, args.compare_api_key))
    except ValueError as e:
        stderr.write(f"error: {e}\n")
        return 1
    settings = BenchSettings(
        max_tokens=args.max_tokens, concurrency=args.concurrency, requests=args.requests,
        warmup=args.warmup, prompt=args.prompt, model=args.model,
        gateway_only=args.gateway_only, connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
    )
    runs = [TargetRun(target) for target in targets]
    per_url = settings.requests * (len(OVERHEAD_PATHS) + (0 if settings.gateway_only else 1))
    show = args.progress or (hasattr(stderr, "isatty") and stderr.isatty())
    progress = Progress(stderr, per_url * len(runs), show)
    try:
        wall_time = asyncio.run(run_all(runs, settings, progress))
    except KeyboardInterrupt:
        progress.close()
        stderr.write("error: interrupted\n")
        return 1
    progress.close()
    report = build_report(settings, runs, wall_time)
    if args.output == "json":
        stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        stdout.write(render_text(report))
    problems = failures(report)
    for problem in problems:
        stderr.write(f"error: {problem}\n")
    return 1 if problems else 0
