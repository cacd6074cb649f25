"""`python -m llamaproxy` runs the same command line as the `llamaproxy` script."""

from __future__ import annotations

import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

import llamaproxy.__main__  # noqa: F401  (importable without running anything)
from llamaproxy import __version__


class MainTests(SynchronousTestCase):
    def test_module_entry_point(self) -> None:
        result = subprocess.run([sys.executable, "-m", "llamaproxy", "--version"],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0)
        self.assertIn(__version__, result.stdout + result.stderr)

    def test_no_command_is_usage_error(self) -> None:
        result = subprocess.run([sys.executable, "-m", "llamaproxy"], capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 1)
