"""Tests for ``llamaproxy usage`` (llamaproxy.cli.usage)."""

from __future__ import annotations

import io
import json
import os
from datetime import date

from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.cli import main
from llamaproxy.cli import usage as usage_cli
from llamaproxy.observability.usage import open_ledger, write_batch

TODAY = date(2026, 6, 1)

ROWS = [
    ("2026-05-30", "alice", "m1", 1, 10, 100, 0),
    ("2026-05-31", "alice", "m1", 2, 20, 200, 0),
    ("2026-05-31", "bob", "m2", 3, 30, 300, 0),
    ("2026-06-01", "alice", "m2", 4, 40, 400, 0),
]


class UsageCliTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(os.path.abspath(self.mktemp()), "usage.sqlite3")
        connection = open_ledger(self.path)
        write_batch(connection, ROWS)
        connection.close()
        self.patch(usage_cli, "_today", lambda: TODAY)

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(["usage", "--file", self.path, *argv], stdout=out, stderr=err)
        self.assertNotIn("Traceback", err.getvalue())
        return code, out.getvalue(), err.getvalue()

    def test_text(self) -> None:
        code, out, err = self.run_cli()
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            out,
            "DAY         KEY_ID  MODEL  REQUESTS  PROMPT  COMPLETION  TOTAL\n"
            "2026-05-30  alice   m1            1      10         100    110\n"
            "2026-05-31  alice   m1            2      20         200    220\n"
            "2026-05-31  bob     m2            3      30         300    330\n"
            "2026-06-01  alice   m2            4      40         400    440\n"
            "\n"
            "Totals per key:\n"
            "KEY_ID  REQUESTS  PROMPT  COMPLETION  TOTAL\n"
            "alice          7      70         700    770\n"
            "bob            3      30         300    330\n"
            "ALL           10     100        1000   1100\n",
        )

    def test_json(self) -> None:
        code, out, _ = self.run_cli("--json", "--key", "alice", "--since", "2026-05-31")
        self.assertEqual(code, 0)
        document = json.loads(out)
        self.assertEqual(
            (document["ledger"], document["key"], document["since"], document["until"]),
            (self.path, "alice", "2026-05-31", None),
        )
        self.assertEqual(
            document["rows"],
            [
                {"day": "2026-05-31", "key_id": "alice", "model": "m1", "requests": 2,
                 "prompt_tokens": 20, "completion_tokens": 200, "total_tokens": 220},
                {"day": "2026-06-01", "key_id": "alice", "model": "m2", "requests": 4,
                 "prompt_tokens": 40, "completion_tokens": 400, "total_tokens": 440},
            ],
        )
        self.assertEqual(
            document["by_key"],
            [{"key_id": "alice", "requests": 6, "prompt_tokens": 60, "completion_tokens": 600,
              "total_tokens": 660}],
        )
        self.assertEqual(document["total"]["total_tokens"], 660)

    def test_relative_days(self) -> None:
        _, out, _ = self.run_cli("--json", "--since", "2d")
        self.assertEqual({row["day"] for row in json.loads(out)["rows"]},
                         {"2026-05-31", "2026-06-01"})
        _, out, _ = self.run_cli("--json", "--since", "yesterday", "--until", "yesterday")
        self.assertEqual(json.loads(out)["total"]["requests"], 5)
        _, out, _ = self.run_cli("--json", "--since", "today")
        self.assertEqual(json.loads(out)["total"]["requests"], 4)

    def test_nothing_matches(self) -> None:
        code, out, _ = self.run_cli("--key", "nobody", "--since", "2026-01-01")
        self.assertEqual(code, 0)
        self.assertEqual(
            out, f"No usage recorded in {self.path} for key_id 'nobody' from 2026-01-01.\n"
        )
        _, out, _ = self.run_cli("--json", "--key", "nobody")
        self.assertEqual(json.loads(out)["rows"], [])

    def test_bad_dates(self) -> None:
        for argv in (("--since", "June"), ("--since", "0d"), ("--until", "2026-13-01"),
                     ("--since", "2026-06-02", "--until", "2026-06-01")):
            code, out, err = self.run_cli(*argv)
            self.assertEqual((code, out), (1, ""), argv)
            self.assertTrue(err.startswith("error: "), err)

    def test_missing_ledger(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        missing = self.path + ".none"
        code = main(["usage", "--file", missing], stdout=out, stderr=err)
        self.assertEqual(code, 1)
        self.assertIn(f"no usage ledger at {missing}", err.getvalue())
        self.assertFalse(os.path.exists(missing))

    def test_not_a_database(self) -> None:
        with open(self.path, "wb") as f:
            f.write(b"this is not sqlite" * 100)
        for name in ("-wal", "-shm"):
            if os.path.exists(self.path + name):
                os.remove(self.path + name)
        code, _, err = self.run_cli()
        self.assertEqual(code, 1)
        self.assertIn("cannot read the usage ledger", err)

    def test_default_ledger_file(self) -> None:
        self.assertEqual(
            usage_cli.default_ledger_file({"USAGE_LEDGER": "/x/u.db", "DATA_DIR": "/d"}),
            "/x/u.db",
        )
        self.assertEqual(usage_cli.default_ledger_file({"DATA_DIR": "/d"}), "/d/usage.sqlite3")
        self.assertEqual(
            usage_cli.default_ledger_file({}, lambda p: p == "/workspace"),
            "/workspace/usage.sqlite3",
        )

    def test_the_quick_start_ledger_without_arguments(self) -> None:
        """Issue 16.12: after the quick start, `llamaproxy usage` looked in /data and failed."""
        workdir = os.path.dirname(self.path)
        os.makedirs(os.path.join(workdir, "data"))
        os.rename(self.path, os.path.join(workdir, "data", "usage.sqlite3"))
        for name in ("-wal", "-shm"):
            if os.path.exists(self.path + name):
                os.rename(self.path + name, os.path.join(workdir, "data", "usage.sqlite3" + name))
        here = os.getcwd()
        os.chdir(workdir)
        self.addCleanup(os.chdir, here)
        for name in ("USAGE_LEDGER", "DATA_DIR"):
            if name in os.environ:
                self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != name})
        out, err = io.StringIO(), io.StringIO()
        self.patch(usage_cli, "default_ledger_file", lambda: "/nonexistent/usage.sqlite3")
        code = main(["usage"], stdout=out, stderr=err)
        self.assertEqual(code, 0, err.getvalue())
        self.assertIn("the quick start's ledger", err.getvalue())
        self.assertIn("alice", out.getvalue())
        self.assertEqual(usage_cli.quick_start_ledger({"DATA_DIR": "/srv"}), None)

    def test_listed_in_help(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(main(["--help"], stdout=out, stderr=err), 0)
        self.assertIn("usage", out.getvalue())
        out = io.StringIO()
        self.assertEqual(main(["usage", "--help"], stdout=out, stderr=err), 0)
        self.assertIn("--since", out.getvalue())
