"""Prometheus families of prompt-cache routing: tokens evaluated vs reused, decisions, memory.

Read from the live router (``routing.Router.memory``) at each scrape; nothing is kept here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric


def prompt_cache_families(router: Any) -> Iterator[Metric]:
    """The families of ``router.memory`` (an ``affinity.AffinityMemory``)."""
    memory = getattr(router, "memory", None)
    if memory is None:
        return
    tokens = CounterMetricFamily(
        "llamaproxy_backend_prompt_tokens",
        "Prompt tokens the backend's responses reported: evaluated, or reused from its cache.",
        labels=["backend", "kind"])
    ratio = GaugeMetricFamily(
        "llamaproxy_backend_prompt_cache_reuse_ratio",
        "Share of the backend's prompt tokens taken from its prompt cache (reused / all).",
        labels=["backend"])
    for name, counts in memory.counts.items():
        tokens.add_metric([name, "evaluated"], counts.evaluated)
        tokens.add_metric([name, "reused"], counts.reused)
        ratio.add_metric([name], counts.reuse_ratio)
    decisions = CounterMetricFamily(
        "llamaproxy_affinity_decisions",
        "Routing decisions of cache_affinity models.", labels=["model", "decision"])
    for (model, decision), count in memory.decisions.items():
        decisions.add_metric([model, decision], count)
    yield from (f for f in (tokens, ratio, decisions) if f.samples)
    yield GaugeMetricFamily("llamaproxy_affinity_remembered_prefixes",
                            "Prefixes whose last backend the router remembers.",
                            value=len(memory))
    yield GaugeMetricFamily("llamaproxy_affinity_memory_bytes",
                            "Approximate memory of the remembered prefixes.",
                            value=memory.approximate_bytes)
