"""Where the streaming CPU goes: per event and per stream request, beside a Python floor.

The harness's streaming CPU mixes two costs: relaying each SSE event, and setting up and ending
each stream (accepting the client connection, reading and checking the request, the backend
request, the response head, the access log, metrics, closing). This splits them with a two-point
fit: rounds of 500 streams of 50 events and of 5 events against the same process, so

    per event  = (CPU(50) - CPU(5)) / (500 * 45)
    per stream = (CPU(5) - 500 * 5 * per event) / 500

(medians of the measured rounds), for llamaproxy (every feature on, as in the harness) and for
**the floor**: ``bench/floor_relay.py``, a raw-epoll relay in Python with no feature at all (no
parsing beyond the first read, no timers, a new backend connection per stream, bytes passed on
as they come). The floor is what any Python gateway pays on this machine for the same system
calls; llamaproxy's excess over it is what its code costs.

    .venv/bin/python -m bench.stream_cost [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.overhead import (
    Plan,
    Server,
    run_streams,
    start_backend,
    start_floor,
    start_gateway,
)
from bench.procs import cores

SHORT, LONG = 5, 50


def _round(proxy: Server, plan: Plan, core: int | None, backend_url: str) -> dict[str, Any]:
    """One measured round, with the proxy's user and system CPU seconds."""
    result = run_streams(proxy, plan, core, backend_url)
    if result["complete"] != result["streams"]:
        raise RuntimeError(f"{proxy.name}: incomplete streams: {result['errors']}")
    return {"user": result["cpu_s"] - result["cpu_system_s"], "system": result["cpu_system_s"],
            "percent": result["cpu_percent"]}


def _fit(long_round: float, short_round: float, streams: int) -> tuple[float, float]:
    """(µs per event, µs per stream request) from the CPU seconds of the two round lengths."""
    per_event = (long_round - short_round) / (streams * (LONG - SHORT))
    per_stream = (short_round - streams * SHORT * per_event) / streams
    return per_event * 1e6, per_stream * 1e6


def measure(name: str, rounds: int) -> dict[str, Any]:
    """The two-point fit for one proxy ("llamaproxy" or "floor")."""
    core_proxy, core_load = (0, 1) if cores() >= 2 else (None, None)
    medians: dict[int, dict[str, float]] = {}
    for events in (LONG, SHORT):
        plan = Plan(events=events)
        root = Path(tempfile.mkdtemp(prefix="llamaproxy-cost-"))
        backend = start_backend(root, plan, core_load)
        try:
            if name == "floor":
                proxy = start_floor(root, backend.url, core_proxy)
            else:
                proxy = start_gateway(root, backend.url, core_proxy)
            try:
                run_streams(proxy, plan, core_load, backend.url)  # unmeasured: pools fill
                results = [_round(proxy, plan, core_load, backend.url) for _ in range(rounds)]
            finally:
                proxy.process.stop()
        finally:
            backend.process.stop()
        medians[events] = {key: statistics.median(r[key] for r in results)
                           for key in ("user", "system", "percent")}
        print(f"{name}, {events} events: CPU-s per round "
              f"{[round(r['user'] + r['system'], 3) for r in results]}, % of a core "
              f"{[round(r['percent']) for r in results]}", file=sys.stderr, flush=True)
    streams = Plan().streams
    result: dict[str, Any] = {"cpu_percent_50_events": medians[LONG]["percent"]}
    for part in ("user", "system"):
        per_event, per_stream = _fit(medians[LONG][part], medians[SHORT][part], streams)
        result[f"{part}_us_per_event"] = per_event
        result[f"{part}_us_per_stream"] = per_stream
    result["us_per_event"] = result["user_us_per_event"] + result["system_us_per_event"]
    result["us_per_stream"] = result["user_us_per_stream"] + result["system_us_per_stream"]
    return result


def _split(result: dict[str, Any], what: str, digits: int) -> str:
    return (f"{result['us_' + what]:.{digits}f} ({result['user_us_' + what]:.{digits}f} + "
            f"{result['system_us_' + what]:.{digits}f})")


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per point")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    results = {name: measure(name, args.rounds) for name in ("floor", "llamaproxy")}
    print(f"500 streams, rounds of {LONG} and {SHORT} events, medians of {args.rounds} "
          f"({started}):")
    print(f"{'':12} {'% of a core':>12} {'µs CPU per event':>22} {'µs CPU per stream':>22}")
    print(f"{'':12} {'(50 events)':>12} {'all (user + system)':>22} {'all (user + system)':>22}")
    for name, r in results.items():
        print(f"{name:12} {r['cpu_percent_50_events']:>12.0f} "
              f"{_split(r, 'per_event', 1):>22} {_split(r, 'per_stream', 0):>22}")
    if args.json:
        args.json.write_text(json.dumps({"started": started, **results}, indent=2))


if __name__ == "__main__":
    main()
