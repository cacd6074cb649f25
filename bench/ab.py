"""Interleaved A/B of llamaproxy checkouts, with the older gateway as the yardstick.

A full run of :mod:`bench.overhead` measures each server a minute or more apart, and on a shared
VM the host drifts by ±20 % in that time: more than one session's cut. This harness takes the
drift out. It starts one fake backend (core 1), the older gateway (when given) and one llamaproxy
per checkout (core 0, every feature on, ``FAST_PATHS=auto``, each checkout's code put first on
``PYTHONPATH``), then runs ``--rounds`` rounds; in each round every server in turn (the order
rotated by one server from round to round) gets wrk at c=64, then wrk at c=1, then (unless
``--streams 0``) one round of concurrent SSE streams. Each figure is then a median over the
rounds, and every ratio (a checkout against the older gateway, a checkout against the first
checkout) is taken within one round before its median: the servers of a round ran seconds
apart, on the same host state.

    .venv/bin/python -m bench.ab --checkout before=/path/to/old/worktree --checkout after=. \\
        [--older-gateway PATH] [--rounds 8] [--duration 5] [--streams 500] [--json out.json]

The CPU figures are the gateway process's own (``/proc`` user + system time over the run), so
they do not depend on the load generator's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import older_gateway
from bench.overhead import (
    API_KEY,
    Plan,
    Server,
    _get,
    gateway_env,
    run_plain,
    run_streams,
    start_backend,
    start_older,
)
from bench.procs import Process, cores, free_port, http_status, pinned, venv_script, wait_until

OLDER = "older"


@dataclass(frozen=True)
class Checkout:
    """A llamaproxy source tree to measure, and its label in the tables."""

    label: str
    path: Path

    def commit(self) -> str | None:
        """The tree's git commit (``+`` when it has uncommitted changes), if it is a git tree."""
        try:
            head = subprocess.run(["git", "-C", str(self.path), "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True, check=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(self.path), "status", "--porcelain",
                                    "--untracked-files=no", "--", "llamaproxy"],
                                   capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
        return head + ("+" if dirty else "")


def parse_checkout(text: str) -> Checkout:
    """``LABEL=PATH`` (or a bare path, labelled by its directory name) of a tree that holds a
    ``llamaproxy`` package."""
    label, _, path = text.rpartition("=")
    tree = Path(path).resolve()
    if not (tree / "llamaproxy" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{tree} holds no llamaproxy package")
    return Checkout(label or tree.name, tree)


def start_checkout(root: Path, backend_url: str, core: int | None, checkout: Checkout) -> Server:
    """``twistd -n llamaproxy`` with ``checkout``'s code (every feature on, FAST_PATHS=auto)."""
    run = root / f"llamaproxy-{checkout.label}"
    run.mkdir(parents=True)
    port = free_port()
    env = gateway_env(run, port, backend_url, "auto")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(checkout.path)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    command = [venv_script("twistd"), "-n", "--pidfile=", "--logfile", str(run / "twistd.log"),
               "llamaproxy"]
    process = Process(checkout.label, pinned(command, core), run / "twistd.out", env=env,
                      cwd=checkout.path)
    wait_until(lambda: http_status(port, "/readyz") == 200, 30, f"{checkout.label} /readyz",
               process)
    return Server(checkout.label, f"http://127.0.0.1:{port}", process, API_KEY, run)


#: The figures kept from each run, by the name the report gives them.
FIGURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "c64_rps": ("c64", ("rps",)),
    "c64_cpu_ms": ("c64", ("cpu_s_per_1000",)),
    "c1_p50_ms": ("c1", ("latency_ms", "p50")),
    "c1_cpu_ms": ("c1", ("cpu_s_per_1000",)),
    "streams_cpu_percent": ("streams", ("cpu_percent",)),
    "streams_gap_p99_ms": ("streams", ("gap_ms", "p99")),
    "streams_first_byte_p50_ms": ("streams", ("first_byte_ms", "p50")),
}


def round_figures(runs: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """One server's figures in one round, from its runs (``c64``, ``c1``, ``streams``)."""
    return {name: _get(runs.get(run), *keys) for name, (run, keys) in FIGURES.items()}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


#: Ratios taken within each round: (name, figure, against whom; "first" = the first checkout).
RATIOS: tuple[tuple[str, str, str], ...] = (
    ("c64 req/s vs the older gateway", "c64_rps", OLDER),
    ("c64 CPU per request vs the older gateway", "c64_cpu_ms", OLDER),
    ("c1 added p50 vs the older gateway's added", "c1_added_p50_ms", OLDER),
    ("c64 CPU per request vs the first checkout", "c64_cpu_ms", "first"),
    ("c1 CPU per request vs the first checkout", "c1_cpu_ms", "first"),
    ("streams CPU vs the first checkout", "streams_cpu_percent", "first"),
)


def summarise(rounds: list[dict[str, dict[str, float | None]]], labels: Sequence[str]
              ) -> dict[str, Any]:
    """Medians (and ranges) of every figure and of every within-round ratio.

    ``rounds`` holds, per round, each server's :func:`round_figures` plus ``direct`` (the fake
    backend measured alone at c=1, for the added latency).
    """
    for figures in rounds:
        direct = figures.get("direct", {}).get("c1_p50_ms")
        for name, own in figures.items():
            if name != "direct":
                p50 = own.get("c1_p50_ms")
                own["c1_added_p50_ms"] = (None if p50 is None or direct is None
                                          else p50 - direct)
    servers = [name for name in rounds[0] if name != "direct"] if rounds else []

    def spread(values: list[float | None]) -> dict[str, float] | None:
        known = [v for v in values if v is not None]
        if not known:
            return None
        return {"median": statistics.median(known), "min": min(known), "max": max(known),
                "n": len(known)}

    medians = {
        server: {figure: spread([r[server].get(figure) for r in rounds])
                 for figure in [*FIGURES, "c1_added_p50_ms"]}
        for server in servers
    }
    ratios: dict[str, dict[str, Any]] = {}
    for title, figure, against in RATIOS:
        reference = labels[0] if against == "first" else against
        if reference not in servers:
            continue
        for label in labels:
            if label == reference:
                continue
            values = [_ratio(r[label].get(figure), r[reference].get(figure)) for r in rounds]
            ratios.setdefault(title, {})[label] = spread(values)
    return {"medians": medians, "ratios": ratios}


def markdown(summary: dict[str, Any], labels: Sequence[str], rounds: int) -> str:
    """The two tables docs/performance.md quotes."""
    servers = list(summary["medians"])
    titles = {OLDER: "older gateway"}
    lines = [f"Medians of {rounds} interleaved rounds:", "",
             "| figure | " + " | ".join(titles.get(s, s) for s in servers) + " |",
             "|---|" + "---|" * len(servers)]
    names = {"c64_rps": "c=64 req/s", "c64_cpu_ms": "c=64 CPU-ms per request",
             "c1_added_p50_ms": "c=1 added p50 (ms)", "c1_cpu_ms": "c=1 CPU-ms per request",
             "streams_cpu_percent": "streams: % of a core",
             "streams_gap_p99_ms": "streams: p99 gap between events (ms)",
             "streams_first_byte_p50_ms": "streams: first byte p50 (ms)"}
    for figure, name in names.items():
        cells = []
        for server in servers:
            value = summary["medians"][server].get(figure)
            cells.append("-" if value is None else f"{value['median']:.3f}")
        if any(cell != "-" for cell in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios taken within each round (median, range over the rounds):", "",
              "| ratio | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for title, by_label in summary["ratios"].items():
        cells = []
        for label in labels:
            value = by_label.get(label)
            cells.append("-" if value is None else
                         f"{value['median']:.2f}x ({value['min']:.2f}-{value['max']:.2f})")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def measure(servers: Sequence[Server], backend: Server, rounds: int, duration: float,
            plan: Plan, core: int | None, use_streams: bool,
            run_plain_: Callable[..., dict[str, Any]] = run_plain,
            run_streams_: Callable[..., dict[str, Any]] = run_streams,
            ) -> list[dict[str, dict[str, float | None]]]:
    """``rounds`` rounds, each server in turn within each (the order rotated by one server
    each round); every server's figures per round, in ``servers``' order."""
    for server in servers:  # warm-up: pools filled, code paths hot
        run_plain_(server, 64, 2.0, core, True, backend.url)
    results = []
    for number in range(rounds):
        figures: dict[str, dict[str, float | None]] = {
            "direct": round_figures({"c1": run_plain_(backend, 1, duration, core, True,
                                                      backend.url)})}
        # Each round starts with the next server: none is always measured first or last.
        shift = number % len(servers) if servers else 0
        for server in [*servers[shift:], *servers[:shift]]:
            runs = {"c64": run_plain_(server, 64, duration, core, True, backend.url),
                    "c1": run_plain_(server, 1, duration, core, True, backend.url)}
            if use_streams:
                runs["streams"] = run_streams_(server, plan, core, backend.url)
            figures[server.name] = round_figures(runs)
        results.append(figures)
    return results


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", action="append", type=parse_checkout, required=True,
                        metavar="LABEL=PATH", help="a llamaproxy tree to measure (repeat; the "
                        "first is the reference of the within-round ratios)")
    parser.add_argument("--older-gateway", type=Path, metavar="PATH",
                        default=os.environ.get("BENCH_OLDER_GATEWAY") or None,
                        help="an export of zepfu/llama-gguf-inference (default: "
                             "$BENCH_OLDER_GATEWAY; none: its column is skipped)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--streams", type=int, default=500,
                        help="concurrent streams per stream round (0: no streams)")
    parser.add_argument("--json", type=Path, help="write the results document here")
    parser.add_argument("--markdown", type=Path, help="write the tables here")
    args = parser.parse_args()
    labels = [c.label for c in args.checkout]
    if len(set(labels)) != len(labels) or OLDER in labels:
        parser.error(f"checkout labels must be distinct and not {OLDER!r}: {labels}")
    if args.rounds < 1 or args.duration <= 0 or args.streams < 0:
        parser.error("--rounds and --duration must be positive, --streams not negative")
    if shutil.which("wrk") is None:
        parser.error("wrk is needed (apt-get install -y wrk)")
    if args.older_gateway is not None:
        try:
            older_gateway.script(args.older_gateway)
        except ValueError as error:
            parser.error(str(error))
    plan = Plan(streams=args.streams or 1)
    proxy_core, load_core = (0, 1) if cores() >= 2 else (None, None)
    root = Path(tempfile.mkdtemp(prefix="llamaproxy-ab-"))
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    servers: list[Server] = []
    processes: list[Process] = []
    try:
        backend = start_backend(root, plan, load_core)
        processes.append(backend.process)
        if args.older_gateway is not None:
            older, _ = start_older(args.older_gateway, root, backend.url, proxy_core)
            servers.append(older)
            processes.append(older.process)
        for checkout in args.checkout:
            server = start_checkout(root, backend.url, proxy_core, checkout)
            servers.append(server)
            processes.append(server.process)
        rounds = measure(servers, backend, args.rounds, args.duration, plan, load_core,
                         args.streams > 0)
    finally:
        for process in reversed(processes):
            process.stop()
        shutil.rmtree(root, ignore_errors=True)
    summary = summarise(rounds, labels)
    results = {
        "started": started,
        "ended": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "checkouts": {c.label: {"path": str(c.path), "commit": c.commit()}
                      for c in args.checkout},
        "rounds": rounds, **summary,
    }
    text = markdown(summary, labels, args.rounds)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
