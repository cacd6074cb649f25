"""Tests for :mod:`bench.ratios` (issue 18's goals as ratios) and the goals table of
:mod:`bench.overhead`'s report: the arithmetic of every figure, the verdicts, what is left
unmeasured and why, and that a smoke run judges nothing. No process is started."""

from __future__ import annotations

import copy
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from bench import overhead, ratios


def _plain(p50_c1: float, rps: float, cpu_per_1000: float) -> dict[str, Any]:
    return {
        "c1": {"latency_ms": {"p50": p50_c1, "p99": p50_c1 * 2}, "rps": 1000 / p50_c1,
               "cpu_s_per_1000": cpu_per_1000, "cpu_percent": 50.0},
        "c64": {"latency_ms": {"p50": 10.0, "p99": 20.0}, "rps": rps,
                "cpu_s_per_1000": cpu_per_1000, "cpu_percent": 99.0,
                "upstream_connections_opened": 64, "rss_mb": 30.0},
    }


def _streams(first_byte: float, gap_p99: float, cpu: float, rss: float) -> dict[str, Any]:
    return {"first_byte_ms": {"p50": first_byte, "p99": first_byte * 2},
            "gap_ms": {"p50": 20.0, "p99": gap_p99}, "cpu_percent": cpu, "peak_rss_mb": rss}


def results(smoke: bool = False) -> dict[str, Any]:
    """A results document shaped like bench.overhead's: the issue's own example table
    (direct taken as 0.10 ms at c=1, 1.0 ms first byte, 21 ms gap p99)."""
    return {
        "smoke": smoke,
        "plan": {"concurrencies": [1, 64], "streams": 500, "queued": 10_000, "events": 50,
                 "interval_ms": 20.0, "ramp": 0.5, "stream_rounds": 1},
        "plain": {
            "tool": "wrk",
            "direct": _plain(0.10, 30_000, 0.02),
            "nginx": _plain(0.15, 26_841, 0.035),
            "older": _plain(1.78, 720, 1.41),
            "llamaproxy": _plain(0.78, 1_317, 0.75),
            "llamaproxy-off": _plain(0.30, 3_000, 0.30),
        },
        "streams": {
            "direct": _streams(1.0, 21.0, 10.0, 20.0),
            "nginx": _streams(1.0, 27.0, 41.0, 23.0),
            "older": _streams(507.0, 182.0, 70.0, 31.0),
            "llamaproxy": _streams(91.0, 69.0, 51.0, 66.0),
            "llamaproxy-off": _streams(11.0, 30.0, 44.0, 90.0),
        },
        "queued": {
            "llamaproxy": {"waiting": 10_000, "rss_before_mb": 61.5, "rss_mb": 141.7,
                           "kib_per_request": 8.2},
            "llamaproxy-off": {"waiting": 10_000, "rss_before_mb": 60.0, "rss_mb": 170.0,
                               "kib_per_request": 11.3},
        },
        "machine": {"nproc": 2, "cpu": "test", "kernel": "k", "python": "3", "twisted": "t",
                    "nginx": "nginx", "wrk": "wrk"},
        "pinning": "not pinned",
        "notes": [],
    }


def figure(document: dict[str, Any], index: int, variant: str = "auto") -> dict[str, Any]:
    cell: dict[str, Any] = ratios.goal_rows(document)[index]["variants"][variant]
    return cell


class FigureTests(SynchronousTestCase):
    """Each goal's figure from the numbers it is made of."""

    def test_requests_per_second_over_the_older_gateway(self) -> None:
        cell = figure(results(), 0)
        self.assertAlmostEqual(cell["value"], 1_317 / 720)
        self.assertEqual(cell["text"], "1.83x")
        self.assertEqual(cell["detail"], "1317 / 720 req/s")
        self.assertEqual(cell["verdict"], "not met")  # goal: at least 4x
        self.assertEqual(figure(results(), 0, "off")["verdict"], "met")  # 3000 / 720 = 4.17

    def test_cpu_per_request_over_the_older_gateway(self) -> None:
        cell = figure(results(), 1)
        self.assertAlmostEqual(cell["value"], 0.75 / 1.41)
        self.assertEqual(cell["verdict"], "not met")  # goal: at most 0.25x
        self.assertEqual(figure(results(), 1, "off")["verdict"], "met")  # 0.30 / 1.41 = 0.21

    def test_added_latency_is_measured_against_the_backend(self) -> None:
        # (0.78 - 0.10) / (1.78 - 0.10), not 0.78 / 1.78
        cell = figure(results(), 2)
        self.assertAlmostEqual(cell["value"], 0.68 / 1.68)
        self.assertEqual(cell["detail"], "+0.680 / +1.680 ms")
        self.assertEqual(cell["verdict"], "not met")
        self.assertAlmostEqual(figure(results(), 2, "off")["value"], 0.20 / 1.68)
        self.assertEqual(figure(results(), 2, "off")["verdict"], "met")

    def test_stream_cpu_over_nginx(self) -> None:
        self.assertAlmostEqual(figure(results(), 3)["value"], 51 / 41)
        self.assertEqual(figure(results(), 3)["verdict"], "not met")  # 1.24 > 1.1
        self.assertEqual(figure(results(), 3, "off")["verdict"], "met")  # 44 / 41 = 1.07

    def test_event_p99_is_a_difference_of_added_p99s(self) -> None:
        # (69 - 21) - (27 - 21) = 42 ms over nginx's
        cell = figure(results(), 4)
        self.assertAlmostEqual(cell["value"], 42.0)
        self.assertEqual(cell["text"], "+42.0 ms")
        self.assertEqual(cell["verdict"], "not met")
        self.assertAlmostEqual(figure(results(), 4, "off")["value"], 3.0)
        self.assertEqual(figure(results(), 4, "off")["verdict"], "met")

    def test_first_byte_over_the_older_gateways_added(self) -> None:
        self.assertAlmostEqual(figure(results(), 5)["value"], 90 / 506)
        self.assertEqual(figure(results(), 5)["verdict"], "not met")
        self.assertAlmostEqual(figure(results(), 5, "off")["value"], 10 / 506)
        self.assertEqual(figure(results(), 5, "off")["verdict"], "met")

    def test_memory_is_absolute(self) -> None:
        self.assertEqual(figure(results(), 6)["text"], "66.0 MB")
        self.assertEqual(figure(results(), 6)["verdict"], "met")
        self.assertEqual(figure(results(), 6, "off")["verdict"], "not met")  # 90 > 80

    def test_queued_memory_is_what_the_queue_adds(self) -> None:
        cell = figure(results(), 7)
        self.assertAlmostEqual(cell["value"], 141.7 - 61.5)
        self.assertEqual(cell["detail"], "61.5 → 141.7 MB, 10000 waiting")
        self.assertEqual(cell["verdict"], "met")
        self.assertEqual(figure(results(), 7, "off")["verdict"], "not met")  # 110 > 100

    def test_limits_are_issue_18s(self) -> None:
        self.assertEqual([row["goal"] for row in ratios.goal_rows(results())],
                         ["≥ 4x", "≤ 0.25x", "≤ 0.2x", "≤ 1.1x", "≤ +10 ms", "≤ 0.05x",
                          "≤ 80 MB", "≤ 100 MB"])

    def test_labels_carry_the_runs_sizes(self) -> None:
        document = results()
        document["plan"].update(streams=50, queued=200)
        labels = [row["figure"] for row in ratios.goal_rows(document)]
        self.assertIn("50 streams: gateway CPU vs nginx", labels)
        self.assertIn("200 queued requests: RSS they add", labels)
        self.assertEqual(labels[0], "c=64 req/s vs the older gateway")


class MissingTests(SynchronousTestCase):
    """What cannot be computed is not measured, and the table says why."""

    def test_without_the_older_gateway(self) -> None:
        document = results()
        del document["plain"]["older"], document["streams"]["older"]
        rows = ratios.goal_rows(document)
        for index in (0, 1, 2, 5):
            self.assertIsNone(rows[index]["variants"]["auto"]["value"])
            self.assertEqual(rows[index]["variants"]["auto"]["verdict"], "not measured")
        self.assertEqual(rows[3]["variants"]["auto"]["verdict"], "not met")  # nginx is there
        self.assertIn("no older gateway", ratios.table(document, rows))

    def test_without_nginx(self) -> None:
        document = results()
        del document["plain"]["nginx"], document["streams"]["nginx"]
        rows = ratios.goal_rows(document)
        self.assertEqual(rows[3]["variants"]["auto"]["text"], "-")
        self.assertEqual(rows[4]["variants"]["auto"]["verdict"], "not measured")
        self.assertIn("no nginx", ratios.table(document, rows))

    def test_a_denominator_that_is_not_positive_is_not_a_ratio(self) -> None:
        document = results()
        document["plain"]["older"]["c1"]["latency_ms"]["p50"] = 0.05  # faster than direct
        self.assertIsNone(figure(document, 2)["value"])

    def test_without_the_queue_measurement(self) -> None:
        document = results()
        document["queued"] = {}
        self.assertEqual(figure(document, 7)["verdict"], "not measured")
        self.assertIn("queued-requests measurement did not run",
                      ratios.table(document, ratios.goal_rows(document)))

    def test_only_the_variants_that_ran(self) -> None:
        document = results()
        del document["plain"]["llamaproxy-off"]
        self.assertEqual(list(ratios.goal_rows(document)[0]["variants"]), ["auto"])


class TableTests(SynchronousTestCase):
    """The one table: a row per goal, per variant the figure, where it comes from, the verdict."""

    def test_full_run(self) -> None:
        document = results()
        text = ratios.table(document, ratios.goal_rows(document))
        lines = text.splitlines()
        self.assertEqual(lines[0], "| figure | goal | FAST_PATHS=auto | from | auto: met? | "
                                   "FAST_PATHS=off | from | off: met? |")
        self.assertEqual(lines[2], "| c=64 req/s vs the older gateway | ≥ 4x | 1.83x | "
                                   "1317 / 720 req/s | not met | 4.17x | 3000 / 720 req/s | met |")
        self.assertEqual(len([line for line in lines if line.startswith("| ")]), 9)  # head, 8 goals
        self.assertIn("FAST_PATHS=auto: 2 of 8 goals met, 6 not met, 0 not measured.", text)
        self.assertIn("FAST_PATHS=off: 6 of 8 goals met, 2 not met, 0 not measured.", text)

    def test_smoke_judges_nothing(self) -> None:
        document = results(smoke=True)
        rows = ratios.goal_rows(document)
        self.assertTrue(all(cell["verdict"] is None for row in rows
                            for cell in row["variants"].values()))
        text = ratios.table(document, rows)
        self.assertNotIn("met", text)
        self.assertIn("| 1.83x | 1317 / 720 req/s | 4.17x |", text)


class ReportTests(SynchronousTestCase):
    """bench.overhead's markdown carries the goals table, judged or not."""

    def document(self, smoke: bool) -> dict[str, Any]:
        document = copy.deepcopy(results(smoke))
        document["goals"] = ratios.goal_rows(document)
        return document

    def test_full_run_report(self) -> None:
        text = overhead.markdown(self.document(smoke=False))
        self.assertIn("| | direct | nginx | older gateway | llamaproxy (auto) | llamaproxy (off) |",
                      text)
        self.assertIn("Issue 18's goals", text)
        self.assertIn("| 500 streams: RSS (peak) | ≤ 80 MB | 66.0 MB", text)
        self.assertIn("| llamaproxy (auto) | 61.5 | 141.7 | 80.2 | 8.2 | 10000 |", text)
        self.assertNotIn("smoke run", text)

    def test_the_streams_say_when_the_backend_closed_after_each(self) -> None:
        document = self.document(smoke=False)
        self.assertNotIn("closes its connection", overhead.markdown(document))
        document["plan"]["backend_closes_after_streams"] = True
        self.assertIn("by first-byte p50; the backend closes its connection after each stream, "
                      "as llama-server does):", overhead.markdown(document))

    def test_the_kernels_share_of_the_cpu(self) -> None:
        document = self.document(smoke=False)
        document["streams"]["nginx"]["cpu_system_percent"] = 30.0
        document["streams"]["llamaproxy"]["cpu_system_percent"] = 24.0
        document["plain"]["older"]["c64"]["cpu_system_percent"] = 40.0
        text = overhead.markdown(document)
        self.assertIn("| of which in the kernel (% of a core) | - | 30 | - | 24 | - |", text)
        self.assertIn("| c=64: of which in the kernel (% of a core) | - | - | 40 | - | - |", text)

    def test_the_floor_relay_is_judged_by_the_same_goals(self) -> None:
        document = results()
        document["plain"]["floor"] = _plain(0.50, 20_000, 0.03)
        document["streams"]["floor"] = _streams(5.0, 30.0, 20.0, 12.0)
        document["goals"] = ratios.goal_rows(document)
        floor = {row["figure"]: row["variants"]["floor"] for row in document["goals"]}
        self.assertEqual(floor["c=64 req/s vs the older gateway"]["text"], "27.78x")
        self.assertEqual(floor["c=1 added p50 vs the older gateway's added"]["verdict"],
                         "not met")  # +0.40 / +1.68 ms: 0.24x
        self.assertEqual(floor["10000 queued requests: RSS they add"]["verdict"], "not measured")
        text = overhead.markdown(document)
        self.assertIn("| figure | goal | FAST_PATHS=auto | from | auto: met? | FAST_PATHS=off "
                      "| from | off: met? | floor relay | from | floor: met? |", text)
        self.assertIn("\nfloor relay: 6 of 8 goals met, 1 not met, 1 not measured.", text)
        self.assertIn("| | direct | nginx | older gateway | floor relay | llamaproxy (auto) |",
                      text)

    def test_smoke_report_without_the_older_gateway(self) -> None:
        document = results(smoke=True)
        for part in ("plain", "streams"):
            del document[part]["older"], document[part]["nginx"]
        document["goals"] = ratios.goal_rows(document)
        text = overhead.markdown(document)
        self.assertIn("| | direct | llamaproxy (auto) | llamaproxy (off) |", text)
        self.assertIn("| c=64 req/s vs the older gateway | ≥ 4x | - |  | - |  |", text)
        self.assertIn("smoke run", text)
        self.assertNotIn("not met", text)
