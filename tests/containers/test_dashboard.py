"""The Grafana dashboard and the compose stack (docker/) against what the gateway really exports.

Every PromQL expression of ``docker/grafana/dashboards/llamaproxy.json`` may only name metrics that
``GatewayMetrics`` exposes to a Prometheus scraper, and only labels those metrics carry; the
compose file's Prometheus scrapes the gateway's /metrics, and Grafana's provisioning points at the
dashboard and the datasource the panels name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.backends.admission import Admission
from llamaproxy.backends.backend import Backend
from llamaproxy.observability.metrics import GatewayMetrics

DOCKER = Path(__file__).resolve().parents[2] / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "llamaproxy.json"

#: PromQL words that are not metric names: functions, aggregations, keywords, Grafana variables.
PROMQL_WORDS = frozenset({
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "and", "or", "unless", "offset", "rate", "irate", "increase", "delta", "idelta",
    "histogram_quantile", "clamp_min", "clamp_max", "abs", "time", "vector", "scalar",
    "label_replace", "sort", "sort_desc", "avg_over_time", "max_over_time", "min_over_time",
    "sum_over_time", "resets", "changes", "absent", "inf", "nan", "le",
})


def exported_series() -> dict[str, set[str]]:
    """Sample name -> label names, from a gateway with a backend, admission and traffic."""
    clock = Clock()
    clock.advance(1000)
    metrics = GatewayMetrics(clock)
    metrics.watch_backend(Backend("llama-server", "http://127.0.0.1:8080", model="tiny"))
    metrics.watch_admission(Admission(max_concurrent=2, max_queue_size=4))
    for route in ("chat", "completions"):
        timer = metrics.request_started(route)
        timer.authenticated("alice")
        timer.queued()
        clock.advance(0.01)
        timer.admitted()
        timer.backend_sent()
        clock.advance(0.2)
        timer.backend_headers(200)
        timer.first_byte_sent()
        timer.tokens("tiny", 10, 20)
        timer.finished(200, "tiny", 100, "complete")
    broken = metrics.request_started("chat")
    broken.admitted()
    broken.backend_sent()
    broken.backend_headers(500)
    broken.first_byte_sent()
    broken.finished(500, "tiny", 10, "client_gone")
    refused = metrics.request_started("chat")
    refused.rejected("auth")
    refused.finished(401, None, 0, "answered")
    body, _ = metrics.render("text/plain;version=0.0.4", include_per_key=False)
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, rows included."""
    out = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def metric_references(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names it is filtered or grouped by) for each selector in ``expr``."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings cannot hold names
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors: [5m], [$__rate_interval]
    expr = re.sub(r"\$\w+", "", expr)
    grouped = set()
    for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        grouped.update(name.strip() for name in clause.split(",") if name.strip())
    expr = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", expr)
    refs = []
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?", expr):
        name, matchers, call = match.groups()
        if call or name in PROMQL_WORDS or re.fullmatch(r"\d.*", name):
            continue
        labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers or ""))
        refs.append((name, labels | grouped))
    return refs


class DashboardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dashboard = json.loads(DASHBOARD.read_text())
        self.series = exported_series()

    def test_every_metric_name_is_exported(self) -> None:
        checked = 0
        for title, expr in expressions(self.dashboard):
            refs = metric_references(expr)
            self.assertTrue(refs, f"{title}: no metric in {expr!r}")
            for name, _ in refs:
                self.assertIn(name, self.series, f"panel {title!r}: {name} is not exported")
                checked += 1
        self.assertGreater(checked, 10)

    def test_every_label_exists_on_its_metric(self) -> None:
        for title, expr in expressions(self.dashboard):
            for name, labels in metric_references(expr):
                carried = self.series.get(name, set()) | {"le"}
                self.assertLessEqual(labels, carried | {"le"},
                                     f"panel {title!r}: {name} has no label {labels - carried}")

    def test_an_unknown_metric_is_caught(self) -> None:
        """The check itself: a misspelt name and a missing label are both found."""
        refs = metric_references('sum by (route) (rate(llamaproxy_request_total{x="1"}[5m]))')
        self.assertEqual(refs, [("llamaproxy_request_total", {"route", "x"})])
        self.assertNotIn("llamaproxy_request_total", self.series)
        self.assertNotIn("x", self.series["llamaproxy_requests_total"])

    def test_the_panels_the_issue_asks_for(self) -> None:
        names = {name for _, expr in expressions(self.dashboard)
                 for name, _ in metric_references(expr)}
        for wanted in (
            "llamaproxy_requests_total",  # request rate
            "llamaproxy_request_duration_seconds_bucket",  # latency percentiles
            "llamaproxy_admission_waiting",  # queue depth
            "llamaproxy_admission_active",  # slots in use
            "llamaproxy_tokens_total",  # tokens/s
            "llamaproxy_rejections_total",  # errors by reason
            "llamaproxy_backend_restarts_total",  # backend restarts
        ):
            self.assertIn(wanted, names)

    def test_panels_use_the_provisioned_datasource(self) -> None:
        datasources = yaml.safe_load(
            (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
        uids = {d["uid"] for d in datasources["datasources"]}
        for panel in self.dashboard["panels"]:
            self.assertIn(panel["datasource"]["uid"], uids, panel["title"])
        ids = [panel["id"] for panel in self.dashboard["panels"]]
        self.assertEqual(len(ids), len(set(ids)))


class ComposeTests(SynchronousTestCase):
    def test_prometheus_scrapes_the_gateway(self) -> None:
        compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
        services = compose["services"]
        self.assertEqual(services["llamaproxy"]["build"]["dockerfile"], "docker/Dockerfile")
        self.assertIn("8000:8000", services["llamaproxy"]["ports"])
        self.assertTrue(services["llamaproxy"]["read_only"])
        mounted = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
        self.assertEqual(mounted["./prometheus/prometheus.yml"], "/etc/prometheus/prometheus.yml")
        prometheus = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
        (job,) = prometheus["scrape_configs"]
        self.assertEqual(job["metrics_path"], "/metrics")
        self.assertEqual(job["static_configs"][0]["targets"], ["llamaproxy:8000"])

    def test_grafana_provisioning_finds_the_dashboard(self) -> None:
        compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
        mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
        provider = yaml.safe_load(
            (DOCKER / "grafana" / "provisioning" / "dashboards" / "llamaproxy.yaml").read_text())
        path = provider["providers"][0]["options"]["path"]
        source = next(src for src, dst in mounts.items() if dst == path)
        self.assertTrue((DOCKER / source / "llamaproxy.json").is_file())
        self.assertIn("./grafana/provisioning", mounts)
