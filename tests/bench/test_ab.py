"""The interleaved A/B harness's bookkeeping: rounds, within-round ratios, medians, report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from bench import ab
from bench.overhead import Plan, Server


def _server(name: str) -> Server:
    return Server(name, f"http://127.0.0.1/{name}", None)  # type: ignore[arg-type]


class MeasureTests(SynchronousTestCase):
    def test_every_server_runs_in_turn_in_every_round_the_order_rotated(self) -> None:
        calls: list[tuple[str, int | str]] = []
        cpu = {"older": 1.0, "a": 0.4, "b": 0.3}

        def plain(server: Server, concurrency: int, *args: Any) -> dict[str, Any]:
            calls.append((server.name, concurrency))
            return {"rps": 100.0 / cpu.get(server.name, 0.01), "cpu_s_per_1000": cpu.get(
                server.name), "latency_ms": {"p50": 0.2 if server.name == "direct" else
                                             0.2 + cpu[server.name]}}

        def streams(server: Server, *args: Any) -> dict[str, Any]:
            calls.append((server.name, "streams"))
            return {"cpu_percent": 50.0, "gap_ms": {"p99": 30.0}, "first_byte_ms": {"p50": 5.0}}

        servers = [_server("older"), _server("a"), _server("b")]
        rounds = ab.measure(servers, _server("direct"), 2, 1.0, Plan(), None, True, plain, streams)
        warm_up = [("older", 64), ("a", 64), ("b", 64)]
        def one_round(*order: str) -> list[tuple[str, int | str]]:
            return [("direct", 1)] + [step for name in order
                                      for step in ((name, 64), (name, 1), (name, "streams"))]

        self.assertEqual(calls, warm_up + one_round("older", "a", "b")
                         + one_round("a", "b", "older"))
        self.assertEqual(len(rounds), 2)
        self.assertEqual(rounds[0]["b"]["c64_cpu_ms"], 0.3)
        self.assertEqual(rounds[0]["b"]["streams_gap_p99_ms"], 30.0)
        self.assertEqual(rounds[0]["direct"]["c1_p50_ms"], 0.2)

        summary = ab.summarise(rounds, ["a", "b"])
        self.assertAlmostEqual(summary["medians"]["a"]["c1_added_p50_ms"]["median"], 0.4)
        ratios = summary["ratios"]
        self.assertAlmostEqual(ratios["c64 CPU per request vs the older gateway"]["b"]["median"],
                               0.3)
        self.assertAlmostEqual(
            ratios["c64 CPU per request vs the first checkout"]["b"]["median"], 0.75)
        self.assertNotIn("a", ratios["c64 CPU per request vs the first checkout"])
        self.assertAlmostEqual(
            ratios["c1 added p50 vs the older gateway's added"]["a"]["median"], 0.4)

    def test_ratios_are_taken_within_a_round_before_the_median(self) -> None:
        # The host drifts: round 2 is twice as slow for everyone. Within-round ratios stay
        # 0.5; medians of the figures taken apart would not say so.
        rounds: list[dict[str, dict[str, float | None]]] = [
            {"direct": {"c1_p50_ms": 0.1}, "older": {"c64_cpu_ms": 1.0}, "a": {"c64_cpu_ms": 0.5}},
            {"direct": {"c1_p50_ms": 0.1}, "older": {"c64_cpu_ms": 2.0}, "a": {"c64_cpu_ms": 1.0}},
            {"direct": {"c1_p50_ms": 0.1}, "older": {"c64_cpu_ms": 4.0}, "a": {"c64_cpu_ms": 2.0}},
        ]
        summary = ab.summarise(rounds, ["a"])
        ratio = summary["ratios"]["c64 CPU per request vs the older gateway"]["a"]
        self.assertEqual((ratio["median"], ratio["min"], ratio["max"], ratio["n"]),
                         (0.5, 0.5, 0.5, 3))
        self.assertIsNone(summary["medians"]["a"]["c64_rps"])

    def test_missing_figures_are_not_guessed(self) -> None:
        rounds: list[dict[str, dict[str, float | None]]] = [
            {"direct": {"c1_p50_ms": None}, "a": {"c1_p50_ms": 0.5, "c64_cpu_ms": 0.0}},
        ]
        summary = ab.summarise(rounds, ["a"])
        self.assertIsNone(summary["medians"]["a"]["c1_added_p50_ms"])
        self.assertEqual(summary["ratios"], {})

    def test_markdown_names_every_server_and_ratio(self) -> None:
        rounds: list[dict[str, dict[str, float | None]]] = [
            {"direct": {"c1_p50_ms": 0.1},
             "older": {"c64_rps": 900.0, "c64_cpu_ms": 1.0, "c1_p50_ms": 1.1},
             "a": {"c64_rps": 3000.0, "c64_cpu_ms": 0.3, "c1_p50_ms": 0.4},
             "b": {"c64_rps": 3300.0, "c64_cpu_ms": 0.27, "c1_p50_ms": 0.35}},
        ]
        text = ab.markdown(ab.summarise(rounds, ["a", "b"]), ["a", "b"], 1)
        self.assertIn("| c=64 req/s | 900.000 | 3000.000 | 3300.000 |", text)
        self.assertIn("| c64 CPU per request vs the first checkout | - | 0.90x (0.90-0.90) |",
                      text)
        self.assertIn("| c64 req/s vs the older gateway | 3.33x (3.33-3.33) | 3.67x", text)
        self.assertNotIn("streams", text.split("Ratios")[0])


class CheckoutTests(SynchronousTestCase):
    def test_a_tree_without_llamaproxy_is_refused(self) -> None:
        empty = Path(self.mktemp())
        empty.mkdir()
        with self.assertRaises(argparse.ArgumentTypeError):
            ab.parse_checkout(f"x={empty}")

    def test_label_and_path(self) -> None:
        tree = Path(self.mktemp())
        (tree / "llamaproxy").mkdir(parents=True)
        (tree / "llamaproxy" / "__init__.py").write_text("")
        self.assertEqual(ab.parse_checkout(f"before={tree}"), ab.Checkout("before", tree.resolve()))
        self.assertEqual(ab.parse_checkout(str(tree)).label, tree.name)
