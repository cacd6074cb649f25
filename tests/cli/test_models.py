"""Tests for ``llamaproxy models list|load|unload`` (llamaproxy.cli.models) against a stub
gateway that records what it was asked."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.cli import main


class _Gateway(BaseHTTPRequestHandler):
    server: _StubServer

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        self._answer(None)

    def do_POST(self) -> None:
        self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    def _answer(self, body: object) -> None:
        self.server.calls.append((self.command, self.path, self.headers["Authorization"], body))
        if self.headers["Authorization"] != "Bearer sk-admin":
            status, doc = 403, {"error": {"message": "This key may not use admin routes"}}
        elif self.path == "/admin/models":
            status, doc = 200, {"object": "list", "data": [
                {"backend": "qwen", "models": ["qwen", "q"], "state": "ready", "group": "gpu0",
                 "idle_ttl": 600.0, "in_flight": 2, "queued": 0}]}
        else:
            status, doc = 200, {"backend": "qwen", "state": "stopped"}
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _StubServer(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Gateway)
        self.calls: list[tuple[str, str, str, object]] = []


class ModelsCliTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = _StubServer()
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(["models", *argv], stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    def test_list_load_unload(self) -> None:
        code, out, _ = self.run_cli("list", "--url", self.url, "--key", "sk-admin")
        self.assertEqual(code, 0)
        self.assertIn("qwen", out)
        self.assertIn("ready", out)
        self.assertIn("gpu0", out)
        code, out, _ = self.run_cli("load", "q", "--url", self.url, "--key", "sk-admin")
        self.assertEqual((code, out), (0, "qwen: stopped\n"))
        code, out, _ = self.run_cli("unload", "qwen", "--url", self.url, "--key", "sk-admin",
                                    "--json")
        self.assertEqual(json.loads(out), {"backend": "qwen", "state": "stopped"})
        self.assertEqual(self.server.calls, [
            ("GET", "/admin/models", "Bearer sk-admin", None),
            ("POST", "/admin/models/load", "Bearer sk-admin", {"model": "q"}),
            ("POST", "/admin/models/unload", "Bearer sk-admin", {"model": "qwen"}),
        ])

    def test_errors(self) -> None:
        code, _, err = self.run_cli("list", "--url", self.url, "--key", "sk-other")
        self.assertEqual(code, 1)
        self.assertIn("403 This key may not use admin routes", err)
        code, _, err = self.run_cli("list", "--url", self.url, "--key", "")
        self.assertEqual(code, 1)
        self.assertIn("an admin key is needed", err)
        code, _, err = self.run_cli("list", "--url", "http://127.0.0.1:1", "--key", "k")
        self.assertEqual(code, 1)
        self.assertIn("error: http://127.0.0.1:1/admin/models:", err)
        code, _, err = self.run_cli()
        self.assertEqual(code, 1)  # `llamaproxy models` alone prints its help
