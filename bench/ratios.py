"""Issue 18's goals, stated as ratios to the older gateway and nginx measured in the same run.

Absolute speed targets do not survive a change of host; ratios measured side by side do. From the
overhead harness's results document (:mod:`bench.overhead`), each goal gives one figure per
llamaproxy variant (``FAST_PATHS=auto`` and ``off``), and one for the floor relay when it ran: a
ratio, a difference in ms, or (memory does not depend on the host's speed) an absolute size. A
figure whose inputs are missing (no older gateway given, no nginx installed, a denominator that is
not positive) is not measured, never guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

#: The llamaproxy variants of a run: the FAST_PATHS value → the server's name in the results.
VARIANTS = {"auto": "llamaproxy", "off": "llamaproxy-off"}
#: The reference judged by the same goals: ``bench/floor_relay.py``, a raw-epoll relay in Python
#: with no feature at all. A goal it does not meet on a host is out of reach of any Python
#: gateway there (what it pays is system calls and the interpreter's loop, nothing else).
FLOOR = "floor"
#: Column titles of the judged servers.
COLUMN_TITLES = {"auto": "FAST_PATHS=auto", "off": "FAST_PATHS=off", FLOOR: "floor relay"}
OLDER = "older"
NGINX = "nginx"
DIRECT = "direct"


@dataclass(frozen=True)
class Figure:
    """One measured figure and the numbers it was made from."""

    value: float
    detail: str


def _get(document: Any, *keys: str) -> float | None:
    for key in keys:
        if not isinstance(document, dict) or document.get(key) is None:
            return None
        document = document[key]
    return float(document)


def _added(results: dict[str, Any], part: str, server: str, *keys: str) -> float | None:
    """``server``'s figure minus the backend's own (``direct``)."""
    value, direct = _get(results[part], server, *keys), _get(results[part], DIRECT, *keys)
    return None if value is None or direct is None else value - direct


def _ratio(numerator: float | None, denominator: float | None, detail: str) -> Figure | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return Figure(numerator / denominator, detail.format(a=numerator, b=denominator))


def _high(results: dict[str, Any]) -> str:
    return f"c{max(results['plan']['concurrencies'])}"


def _low(results: dict[str, Any]) -> str:
    return f"c{min(results['plan']['concurrencies'])}"


def rps_vs_older(results: dict[str, Any], server: str) -> Figure | None:
    """Requests/s at the highest concurrency over the older gateway's."""
    plain, key = results["plain"], _high(results)
    return _ratio(_get(plain, server, key, "rps"), _get(plain, OLDER, key, "rps"),
                  "{a:.0f} / {b:.0f} req/s")


def cpu_vs_older(results: dict[str, Any], server: str) -> Figure | None:
    """CPU per request at the highest concurrency over the older gateway's."""
    plain, key = results["plain"], _high(results)
    return _ratio(_get(plain, server, key, "cpu_s_per_1000"),
                  _get(plain, OLDER, key, "cpu_s_per_1000"), "{a:.3f} / {b:.3f} CPU-ms")


def added_p50_vs_older(results: dict[str, Any], server: str) -> Figure | None:
    """Added latency p50 at the lowest concurrency over the older gateway's added."""
    key = _low(results)
    return _ratio(_added(results, "plain", server, key, "latency_ms", "p50"),
                  _added(results, "plain", OLDER, key, "latency_ms", "p50"),
                  "{a:+.3f} / {b:+.3f} ms")


def stream_cpu_vs_nginx(results: dict[str, Any], server: str) -> Figure | None:
    """CPU during the streams over nginx's."""
    streams = results["streams"]
    return _ratio(_get(streams, server, "cpu_percent"), _get(streams, NGINX, "cpu_percent"),
                  "{a:.0f} / {b:.0f} % of a core")


def event_p99_over_nginx(results: dict[str, Any], server: str) -> Figure | None:
    """Added p99 between events minus nginx's added p99 (ms)."""
    ours = _added(results, "streams", server, "gap_ms", "p99")
    nginx = _added(results, "streams", NGINX, "gap_ms", "p99")
    if ours is None or nginx is None:
        return None
    return Figure(ours - nginx, f"{ours:+.1f} - ({nginx:+.1f}) ms")


def first_byte_vs_older(results: dict[str, Any], server: str) -> Figure | None:
    """Added first-byte p50 of the streams over the older gateway's added."""
    return _ratio(_added(results, "streams", server, "first_byte_ms", "p50"),
                  _added(results, "streams", OLDER, "first_byte_ms", "p50"),
                  "{a:+.1f} / {b:+.1f} ms")


def stream_rss(results: dict[str, Any], server: str) -> Figure | None:
    """Peak RSS during the streams (MB)."""
    value = _get(results["streams"], server, "peak_rss_mb")
    return None if value is None else Figure(value, "peak (VmHWM)")


def queued_rss(results: dict[str, Any], server: str) -> Figure | None:
    """What the queued requests add to the gateway's RSS (MB): with them waiting minus idle."""
    queued = results.get("queued") or {}
    after, before = _get(queued, server, "rss_mb"), _get(queued, server, "rss_before_mb")
    if after is None or before is None:
        return None
    waiting = _get(queued, server, "waiting")
    detail = f"{before:.1f} → {after:.1f} MB"
    if waiting is not None:
        detail += f", {waiting:.0f} waiting"
    return Figure(after - before, detail)


@dataclass(frozen=True)
class Goal:
    """One of issue 18's goals: the figure, its limit, and how it is computed."""

    figure: str
    unit: Literal["ratio", "ms", "MB"]
    limit: float
    kind: Literal["max", "min"]
    compute: Callable[[dict[str, Any], str], Figure | None]

    def label(self, results: dict[str, Any]) -> str:
        """The figure's name, with this run's sizes."""
        plan = results["plan"]
        return self.figure.format(high=max(plan["concurrencies"]), low=min(plan["concurrencies"]),
                                  streams=plan["streams"], queued=plan.get("queued", 0))

    def limit_text(self) -> str:
        """``≥ 4x``, ``≤ +10 ms``, ``≤ 80 MB``."""
        sign = "≤" if self.kind == "max" else "≥"
        if self.unit == "ratio":
            return f"{sign} {self.limit:g}x"
        if self.unit == "ms":
            return f"{sign} {self.limit:+g} ms"
        return f"{sign} {self.limit:g} MB"

    def met(self, value: float) -> bool:
        """Whether ``value`` meets the goal."""
        return value <= self.limit if self.kind == "max" else value >= self.limit


GOALS = (
    Goal("c={high} req/s vs the older gateway", "ratio", 4.0, "min", rps_vs_older),
    Goal("c={high} CPU per request vs the older gateway", "ratio", 0.25, "max", cpu_vs_older),
    Goal("c={low} added p50 vs the older gateway's added", "ratio", 0.2, "max", added_p50_vs_older),
    Goal("{streams} streams: gateway CPU vs nginx", "ratio", 1.1, "max", stream_cpu_vs_nginx),
    Goal("{streams} streams: added p99 per event minus nginx's", "ms", 10.0, "max",
         event_p99_over_nginx),
    Goal("{streams} streams: added first byte p50 vs the older gateway's added", "ratio", 0.05,
         "max", first_byte_vs_older),
    Goal("{streams} streams: RSS (peak)", "MB", 80.0, "max", stream_rss),
    Goal("{queued} queued requests: RSS they add", "MB", 100.0, "max", queued_rss),
)


def _value_text(goal: Goal, value: float) -> str:
    if goal.unit == "ratio":
        return f"{value:.2f}x"
    if goal.unit == "ms":
        return f"{value:+.1f} ms"
    return f"{value:.1f} MB"


def goal_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every goal with, per variant present in the results, its figure and verdict.

    A verdict is ``"met"``, ``"not met"`` or ``"not measured"``; a smoke run judges nothing
    (``verdict`` is None)."""
    judged = not results.get("smoke", False)
    variants = {name: server for name, server in {**VARIANTS, FLOOR: FLOOR}.items()
                if server in results["plain"]}
    rows = []
    for goal in GOALS:
        row: dict[str, Any] = {"figure": goal.label(results), "goal": goal.limit_text(),
                               "unit": goal.unit, "variants": {}}
        for name, server in variants.items():
            figure = goal.compute(results, server)
            verdict = None
            if judged:
                verdict = ("not measured" if figure is None
                           else "met" if goal.met(figure.value) else "not met")
            row["variants"][name] = {
                "value": None if figure is None else figure.value,
                "text": "-" if figure is None else _value_text(goal, figure.value),
                "detail": "" if figure is None else figure.detail,
                "verdict": verdict,
            }
        rows.append(row)
    return rows


def missing(results: dict[str, Any]) -> list[str]:
    """Why some figures are not measured (a comparison target absent)."""
    reasons = []
    if OLDER not in results["plain"]:
        reasons.append("no older gateway (--older-gateway PATH or BENCH_OLDER_GATEWAY): the "
                       "figures against it are not measured")
    if NGINX not in results["plain"]:
        reasons.append("no nginx: the figures against it are not measured")
    if not results.get("queued"):
        reasons.append("the queued-requests measurement did not run")
    return reasons


def table(results: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The goals as one markdown table: per variant its figure (with the numbers it comes from)
    and, outside smoke runs, met or not met."""
    variants = list(rows[0]["variants"]) if rows else []
    judged = not results.get("smoke", False)
    head = "| figure | goal |"
    rule = "|---|---|"
    for name in variants:
        head += f" {COLUMN_TITLES[name]} | from |"
        rule += "---|---|"
        if judged:
            head += f" {name}: met? |"
            rule += "---|"
    text = head + "\n" + rule + "\n"
    for row in rows:
        text += f"| {row['figure']} | {row['goal']} |"
        for name in variants:
            cell = row["variants"][name]
            text += f" {cell['text']} | {cell['detail']} |"
            if judged:
                text += f" {cell['verdict']} |"
        text += "\n"
    if judged and variants:
        for name in variants:
            verdicts = [row["variants"][name]["verdict"] for row in rows]
            text += (f"\n{COLUMN_TITLES[name]}: {verdicts.count('met')} of {len(rows)} goals met, "
                     f"{verdicts.count('not met')} not met, "
                     f"{verdicts.count('not measured')} not measured.\n")
    for reason in missing(results):
        text += f"\n({reason}.)\n"
    return text
