"""The numbers of a ``llamaproxy bench`` run: nearest-rank statistics, the JSON report, and the
report as text.

Percentiles use the nearest-rank method (as the older gateway's ``benchmark.py`` did): the p-th
percentile of n sorted values is the value at rank ``ceil(p / 100 * n)`` (1-based, at least 1).
It is always one of the measured values, never an interpolation. The JSON report keeps counts and
statistics (milliseconds for times), never raw value lists.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llamaproxy.cli.benchclient import GetResult, StreamResult, Target

DEFAULT_PROMPT = "Write a short poem about the sea"
#: Distinct error messages kept per series in the report.
MAX_ERRORS = 5

#: The statistics every series reports, in display order (``count`` is added separately).
STAT_NAMES = ("min", "mean", "p50", "p95", "p99", "max")

#: The statistics a comparison reports the difference and ratio of.
COMPARED_STATS = ("min", "mean", "p50", "p95", "p99")


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of already sorted, non-empty values."""
    if not sorted_values:
        raise ValueError("percentile of an empty series")
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(values: Sequence[float], scale: float = 1.0) -> dict[str, float | int] | None:
    """count, min, mean, p50, p95, p99, max of ``values`` (each multiplied by ``scale``);
    None for an empty series."""
    if not values:
        return None
    ordered = sorted(v * scale for v in values)
    return {
        "count": len(ordered),
        "min": ordered[0],
        "mean": math.fsum(ordered) / len(ordered),
        "p50": percentile(ordered, 50),
        "p95": percentile(ordered, 95),
        "p99": percentile(ordered, 99),
        "max": ordered[-1],
    }


def added(
    measured: Mapping[str, float | int] | None,
    baseline: Mapping[str, float | int] | None,
) -> dict[str, dict[str, float | None]] | None:
    """Per statistic: ``added`` = measured - baseline and ``ratio`` = measured / baseline
    (None when the baseline is 0); None when either series is missing."""
    if measured is None or baseline is None:
        return None
    result: dict[str, dict[str, float | None]] = {}
    for name in COMPARED_STATS:
        value, base = float(measured[name]), float(baseline[name])
        result[name] = {"added": value - base, "ratio": value / base if base else None}
    return result


@dataclass
class TargetRun:
    """What one URL answered."""

    target: Target
    gets: dict[str, list[GetResult]] = field(default_factory=dict)
    streams: list[StreamResult] = field(default_factory=list)


@dataclass
class BenchSettings:
    """Everything a run needs besides its targets."""

    max_tokens: int = 128
    concurrency: int = 1
    requests: int = 10
    warmup: int = 1
    prompt: str = DEFAULT_PROMPT
    model: str = "default"
    gateway_only: bool = False
    connect_timeout: float = 10.0
    read_timeout: float = 120.0


# -- the report ------------------------------------------------------------------------------


def _errors(messages: Sequence[str | None]) -> list[str]:
    distinct: list[str] = []
    for message in messages:
        if message and message not in distinct:
            distinct.append(message)
            if len(distinct) == MAX_ERRORS:
                break
    return distinct


def target_document(run: TargetRun, wall_time: float | None) -> dict[str, Any]:
    """The JSON report of one URL: counts and statistics, no raw values."""
    overhead = {}
    for path, results in run.gets.items():
        ok = [r.latency for r in results if r.ok]
        overhead[path] = {
            "requests": {"total": len(results), "success": len(ok),
                         "failed": len(results) - len(ok)},
            "latency_ms": summarize(ok, 1000),
            "errors": _errors([r.error for r in results]),
        }
    document: dict[str, Any] = {"url": run.target.url, "overhead": overhead, "inference": None}
    if wall_time is None:
        return document
    streams = run.streams
    ok_streams = [r for r in streams if r.ok]
    sources = {r.token_source for r in ok_streams}
    document["inference"] = {
        "requests": {"total": len(streams), "success": len(ok_streams),
                     "failed": len(streams) - len(ok_streams)},
        "requests_per_s": len(ok_streams) / wall_time if wall_time > 0 else None,
        "ttft_ms": summarize([r.ttft for r in ok_streams if r.ttft is not None], 1000),
        "latency_ms": summarize([r.latency for r in ok_streams], 1000),
        "tokens_per_s": summarize(
            [rate for r in ok_streams if (rate := r.tokens_per_s) is not None]
        ),
        "tokens": summarize([r.tokens for r in ok_streams]),
        "token_source": (sources.pop() if len(sources) == 1 else "mixed") if sources else None,
        "errors": _errors([r.error for r in streams]),
    }
    return document


def added_document(measured: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """What ``measured`` adds over ``baseline``, per series and statistic (ms and ratio)."""
    result: dict[str, Any] = {"overhead": {}}
    for path, series in measured["overhead"].items():
        other = baseline["overhead"].get(path)
        difference = added(series["latency_ms"], other and other["latency_ms"])
        if difference is not None:
            result["overhead"][path] = difference
    if measured["inference"] is not None and baseline["inference"] is not None:
        for name in ("ttft_ms", "latency_ms"):
            result[name] = added(measured["inference"][name], baseline["inference"][name])
    return result


def build_report(
    settings: BenchSettings, runs: Sequence[TargetRun], wall_time: float | None
) -> dict[str, Any]:
    """The whole JSON document of a run."""
    documents = [target_document(run, wall_time) for run in runs]
    return {
        "settings": {
            "url": runs[0].target.url,
            "compare_url": runs[1].target.url if len(runs) > 1 else None,
            "max_tokens": settings.max_tokens,
            "concurrency": settings.concurrency,
            "requests": settings.requests,
            "warmup": settings.warmup,
            "prompt": settings.prompt,
            "model": settings.model,
            "gateway_only": settings.gateway_only,
        },
        "wall_time_s": wall_time,
        "target": documents[0],
        "compare": documents[1] if len(documents) > 1 else None,
        "added": added_document(documents[0], documents[1]) if len(documents) > 1 else None,
    }


def _stats_row(label: str, stats: dict[str, Any] | None, digits: int = 2) -> str:
    if stats is None:
        return f"  {label:<24}" + "no successful request".rjust(10)
    cells = "".join(f"{stats[name]:>10.{digits}f}" for name in STAT_NAMES)
    return f"  {label:<24}{cells}{stats['count']:>8}"


def _header() -> str:
    return "  " + " " * 24 + "".join(f"{name:>10}" for name in STAT_NAMES) + f"{'count':>8}"


def render_text(report: dict[str, Any]) -> str:
    """The report as the human-readable text ``--output text`` prints."""
    settings = report["settings"]
    documents = [d for d in (report["target"], report["compare"]) if d is not None]
    lines = [f"llamaproxy bench: {settings['url']}"]
    if settings["compare_url"]:
        lines.append(f"compared with:    {settings['compare_url']} (same load, interleaved)")
    lines.append(
        f"max_tokens {settings['max_tokens']}, concurrency {settings['concurrency']}, "
        f"{settings['requests']} requests per URL, warmup {settings['warmup']}"
    )
    lines += ["", "Gateway overhead: sequential GET, request written → end of body (ms)",
              _header()]
    for document in documents:
        for path, series in document["overhead"].items():
            label = f"{path} {_short(document['url'])}" if len(documents) > 1 else path
            lines.append(_stats_row(label, series["latency_ms"], 3))
            requests = series["requests"]
            if requests["failed"]:
                lines.append(f"    {requests['failed']}/{requests['total']} failed: "
                             + "; ".join(series["errors"]))
    if report["wall_time_s"] is not None:
        lines += ["", f"Streamed chat completions (wall time {report['wall_time_s']:.2f} s)"]
        for document in documents:
            inference = document["inference"]
            requests = inference["requests"]
            rate = inference["requests_per_s"]
            lines += [
                f"  {document['url']}: {requests['total']} requests, {requests['success']} "
                f"success, {requests['failed']} failed"
                + (f", {rate:.2f} req/s" if rate is not None else ""),
                _header(),
                _stats_row("TTFT (ms)", inference["ttft_ms"]),
                _stats_row("latency (ms)", inference["latency_ms"]),
                _stats_row("tokens/s", inference["tokens_per_s"]),
                _stats_row(f"tokens ({inference['token_source'] or '-'})",
                           inference["tokens"], 0),
            ]
            if inference["errors"]:
                lines.append("    errors: " + "; ".join(inference["errors"]))
    if report["added"]:
        lines += _added_lines(report)
    return "\n".join(lines) + "\n"


def _short(url: str) -> str:
    return url.split("://", 1)[-1]


def _added_lines(report: dict[str, Any]) -> list[str]:
    target, compare = report["target"]["url"], report["compare"]["url"]
    lines = ["", f"Added by {target} over {compare} (ms, and ratio)",
             "  " + " " * 24 + "".join(f"{name:>10}" for name in COMPARED_STATS)]
    series = [(f"GET {path}", diff) for path, diff in report["added"]["overhead"].items()]
    series += [(label, report["added"].get(key)) for key, label in
               (("ttft_ms", "TTFT"), ("latency_ms", "latency"))]
    for label, diff in series:
        if diff is None:
            continue
        lines.append(f"  {label + ' added':<24}"
                     + "".join(f"{diff[name]['added']:>+10.3f}" for name in COMPARED_STATS))
        lines.append(f"  {label + ' ratio':<24}" + "".join(
            f"{ratio:>10.3f}" if (ratio := diff[name]["ratio"]) is not None else f"{'-':>10}"
            for name in COMPARED_STATS))
    return lines


def failures(report: dict[str, Any]) -> list[str]:
    """Why the run should exit 1: a URL that never answered successfully."""
    problems = []
    for document in (report["target"], report["compare"]):
        if document is None:
            continue
        inference = document["inference"]
        if inference is not None:
            if inference["requests"]["success"] == 0:
                errors = "; ".join(inference["errors"]) or "no request succeeded"
                problems.append(f"every chat request to {document['url']} failed: {errors}")
        elif not any(s["requests"]["success"] for s in document["overhead"].values()):
            errors = "; ".join(e for s in document["overhead"].values() for e in s["errors"])
            problems.append(f"every GET to {document['url']} failed: {errors}")
    return problems
