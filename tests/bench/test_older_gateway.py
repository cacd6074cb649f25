"""Tests for :mod:`bench.older_gateway`: the export's path is checked, the environment and key file
follow the older gateway's own formats, and ``/data`` is arranged (or its absence reported)
without a private mount. No process of the older gateway is started."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from unittest import mock

from twisted.trial.unittest import SynchronousTestCase

from bench import older_gateway


class OlderGatewayTests(SynchronousTestCase):
    """Path checks, environment, /data."""

    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="older-gateway-test-"))

    def export(self, *names: str) -> Path:
        (self.tmp / "export" / "scripts").mkdir(parents=True, exist_ok=True)
        for name in names:
            (self.tmp / "export" / "scripts" / name).write_text("# not run\n")
        return self.tmp / "export"

    def test_script_wants_gateway_and_auth(self) -> None:
        with self.assertRaises(ValueError) as raised:
            older_gateway.script(self.tmp)
        self.assertIn("scripts/gateway.py does not exist", str(raised.exception))
        with self.assertRaises(ValueError) as raised:
            older_gateway.script(self.export("gateway.py"))
        self.assertIn("auth.py does not exist", str(raised.exception))
        self.assertEqual(older_gateway.script(self.export("gateway.py", "auth.py")),
                         self.tmp / "export" / "scripts" / "gateway.py")

    def test_environment_and_key_file(self) -> None:
        env = older_gateway.environment(self.tmp, 8123, 9456, "sk-bench-0123456789abcdef0123")
        self.assertEqual((env["PORT"], env["BACKEND_HOST"], env["PORT_BACKEND"]),
                         ("8123", "127.0.0.1", "9456"))
        self.assertEqual(env["AUTH_ENABLED"], "true")
        self.assertEqual(int(env["MAX_CONCURRENT_REQUESTS"]), 1024)
        self.assertGreaterEqual(int(env["MAX_REQUESTS_PER_MINUTE"]), 10**9)
        lines = [line for line in Path(env["AUTH_KEYS_FILE"]).read_text().splitlines()
                 if line and not line.startswith("#")]
        self.assertEqual(lines, ["bench:sk-bench-0123456789abcdef0123"])  # key_id:api_key

    def test_writable_data_without_a_private_mount(self) -> None:
        data = self.tmp / "data-root"
        with mock.patch.object(older_gateway, "DATA", data), \
                mock.patch.object(older_gateway, "_private_mount_works", return_value=False):
            arranged = older_gateway.data_directory(self.tmp / "run")
        self.assertEqual(arranged.prefix, [])
        self.assertEqual(arranged.access_log, data / "logs" / "api_access.log")
        self.assertTrue((data / "logs").is_dir())
        self.assertIn("appended its access log to the real", arranged.notes[-1])

    def test_unwritable_data_is_reported(self) -> None:
        blocker = self.tmp / "a-file"
        blocker.write_text("")
        with mock.patch.object(older_gateway, "DATA", blocker / "data"), \
                mock.patch.object(older_gateway, "_private_mount_works", return_value=False):
            arranged = older_gateway.data_directory(self.tmp / "run")
        self.assertIsNone(arranged.access_log)
        self.assertIn("not comparable", arranged.notes[-1])

    def test_private_mount_binds_the_run_directory(self) -> None:
        data = self.tmp / "mount-point"
        data.mkdir()
        with mock.patch.object(older_gateway, "DATA", data), \
                mock.patch.object(older_gateway.shutil, "which", return_value="/usr/bin/unshare"), \
                mock.patch.object(older_gateway, "_private_mount_works", return_value=True):
            arranged = older_gateway.data_directory(self.tmp / "run")
        self.assertEqual(arranged.prefix[:4], ["unshare", "--mount", "--propagation", "private"])
        self.assertEqual(arranged.prefix[-1], str(self.tmp / "run" / "data"))
        self.assertEqual(arranged.access_log, self.tmp / "run" / "data" / "logs" / "api_access.log")
        self.assertTrue(os.path.isdir(self.tmp / "run" / "data" / "logs"))
