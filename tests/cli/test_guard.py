"""Tests for llamaproxy.cli.guard: user errors become one line on stderr and exit code 1."""

from __future__ import annotations

import argparse
import io
from typing import TextIO

from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.cli.guard import CommandError, guarded


class GuardTests(SynchronousTestCase):
    def run_command(self, error: BaseException | None) -> tuple[int, str]:
        def command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
            """Fails as told."""
            if error is not None:
                raise error
            return 0

        err = io.StringIO()
        code = guarded(command)(argparse.Namespace(), io.StringIO(), err)
        return code, err.getvalue()

    def test_outcomes(self) -> None:
        self.assertEqual(self.run_command(None), (0, ""))
        self.assertEqual(self.run_command(CommandError("no such key")),
                         (1, "error: no such key\n"))
        missing = FileNotFoundError(2, "No such file or directory", "/x/keys.txt")
        self.assertEqual(self.run_command(missing),
                         (1, "error: No such file or directory: /x/keys.txt\n"))
        self.assertRaises(ValueError, self.run_command, ValueError("a bug"))
