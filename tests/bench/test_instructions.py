"""The instruction-count harness's arithmetic and report (the counting itself needs valgrind)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from bench import instructions


class FakeProcess:
    def __init__(self) -> None:
        self.stopped = False

    def stop(self, timeout: float = 10.0) -> int:
        self.stopped = True
        return 0


class InstructionsTests(SynchronousTestCase):
    def _server(self, totals: int) -> instructions.Counted:
        out = Path(self.mktemp())
        out.mkdir()
        (out / "callgrind.out.123").write_text(
            f"# callgrind format\nevents: Ir\nsummary: {totals}\n\ntotals: {totals}\n")
        return instructions.Counted("x", 1, FakeProcess(), out)  # type: ignore[arg-type]

    def test_stop_reads_the_totals(self) -> None:
        server = self._server(123456)
        self.patch(instructions, "collector_instructions", lambda path: 456)
        self.assertEqual(server.stop(), (123456, 456))
        self.assertTrue(server.process.stopped)  # type: ignore[attr-defined]

    def test_measure_takes_the_differences_of_three_lives(self) -> None:
        lives = {"base": 1_000_000, "plain": 1_000_000 + 300 * 2_000, "streams": 1_000_000 + 4_000}
        calls: list[Any] = []

        def start(label: str) -> instructions.Counted:
            calls.append(label)
            return self._server(lives[label])

        collector = {1_000_000: 100, 1_000_000 + 300 * 2_000: 400, 1_000_000 + 4_000: 300}
        self.patch(instructions, "collector_instructions",
                   lambda path: collector[int(path.read_text().split()[-1])])
        self.patch(instructions, "plain_requests", lambda server, count: None)
        self.patch(instructions, "streams", lambda server, count, events: count * events)
        result = instructions.measure(start, 300, 2, 10)
        self.assertEqual(calls, ["base", "plain", "streams"])
        self.assertEqual(result["instructions_per_request"], 2_000 - 1)
        self.assertEqual(result["instructions_per_stream"], 2_000 - 100)
        self.assertEqual(result["collector_per_request"], 1)
        self.assertEqual(result["collector_per_stream"], 100)

    def test_markdown_gives_ratios_to_the_first(self) -> None:
        text = instructions.markdown({
            "a": {"instructions_per_request": 2e6, "instructions_per_stream": 4e6, "events": 20},
            "b": {"instructions_per_request": 1e6, "instructions_per_stream": 6e6, "events": 20},
        })
        self.assertIn("| a | 2.00 | 1.00 | 4.00 | 1.00 | 0.00 / 0.00 |", text)
        self.assertIn("| b | 1.00 | 0.50 | 6.00 | 1.50 | 0.00 / 0.00 |", text)
        self.assertIn("(20 events)", text)
