"""Several backends end to end: two real llama-server children, OpenAI-compatible upstreams.

Routing by model and alias, /v1/models, failover when a child is killed, a circuit breaker
opening on a failing upstream and closing when it recovers, weighted round-robin, a started
stream never retried, and a reload that adds a model without dropping a running stream.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.harness import API_KEY, Gateway, free_port, tiny_model, wait_for
from tests.e2e.test_admission import HeldStream


class Upstream(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible upstream whose answers the test switches (200 or 500)."""

    server: UpstreamServer

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        self._send(200, {"status": "ok"} if self.path.endswith("/health") else
                   {"object": "list", "data": [{"id": "upstream", "object": "model"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.requests += 1
        if self.server.failing:
            self._send(500, {"error": {"message": "upstream broken", "type": "server_error"}})
            return
        self._send(200, {"object": "chat.completion", "model": self.server.name,
                         "choices": [{"index": 0, "finish_reason": "stop", "message": {
                             "role": "assistant", "content": f"from {self.server.name}"}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 2}})

    def _send(self, status: int, doc: object) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class UpstreamServer(ThreadingHTTPServer):
    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), Upstream)
        self.name = name
        self.failing = False
        self.requests = 0
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle_error(self, request: object, client_address: object) -> None:
        """A reset is expected: the gateway drops a failed-over 500's body by closing."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def child(name: str, models: list[str], port: int, priority: int) -> str:
    return f"""
[[backends]]
name = "{name}"
model_path = "{tiny_model()}"
models = {json.dumps(models)}
port = {port}
ctx = 4096
ngl = 0
threads = 1
parallel = 1
priority = {priority}
"""


class RoutingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fallback = UpstreamServer("fallback")
        self.flaky = UpstreamServer("flaky")
        self.addCleanup(self.fallback.close)
        self.addCleanup(self.flaky.close)
        self.ports = [free_port() for _ in range(3)]

    def table(self, with_c: bool = False) -> str:
        text = "[breaker]\nfailure_threshold = 2\nreset_timeout = 2\nsuccess_threshold = 1\n"
        text += '[models.rr]\nstrategy = "round-robin"\n'
        text += child("child-a", ["a", "alias-a", "rr"], self.ports[0], 1)
        text += child("child-b", ["b", "rr"], self.ports[1], 1)
        if with_c:
            text += child("child-c", ["c"], self.ports[2], 1)
        text += f"""
[[backends]]
name = "flaky"
base_url = "{self.flaky.url}"
models = ["f"]
priority = 1

[[backends]]
name = "fallback"
base_url = "{self.fallback.url}"
models = ["a", "f"]
priority = 9
"""
        return text

    def test_routing_failover_breakers_round_robin_and_reload(self) -> None:
        gateway = Gateway(env={"MAX_REQUESTS_PER_MINUTE": "100000"})
        config = gateway.root / "backends.toml"
        config.write_text(self.table())
        gateway.env["LLAMAPROXY_CONFIG"] = str(config)
        del gateway.env["MODEL_PATH"]
        gateway.start()
        self.addCleanup(gateway.stop)
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0)

        def served_by(model: str) -> str:
            result = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3,  # type: ignore[list-item]
                temperature=0,
            )
            return result.model

        wait_for(lambda: all(b["state"] == "ready" for b in gateway.health()["backends"]),  # type: ignore[index, union-attr]
                 60, "every backend to be ready")
        # Routing by model and alias; /v1/models lists what the key may use.
        self.assertEqual(served_by("a"), "a")
        self.assertEqual(served_by("alias-a"), "a")
        self.assertEqual(served_by("b"), "b")
        listed = {m.id: m.owned_by for m in client.models.list().data}
        self.assertEqual(listed, {"a": "child-a", "alias-a": "child-a", "rr": "child-a",
                                  "b": "child-b", "f": "flaky"})
        with self.assertRaises(openai.NotFoundError) as missing:
            served_by("no-such-model")
        self.assertEqual(missing.exception.body["code"], "model_not_found")  # type: ignore[index]

        # Weighted round-robin (equal weights): an even spread.
        spread = [served_by("rr") for _ in range(10)]
        self.assertEqual((spread.count("a"), spread.count("b")), (5, 5))

        # A failing upstream: requests fail over, its breaker opens, then closes on recovery.
        self.flaky.failing = True
        for _ in range(3):
            self.assertEqual(served_by("f"), "fallback")
        breakers = {b["name"]: b for b in gateway.health()["backends"]}  # type: ignore[union-attr]
        self.assertEqual(breakers["flaky"]["breaker"]["state"], "open")  # type: ignore[index]
        seen = self.flaky.requests
        self.assertEqual(served_by("f"), "fallback")
        self.assertEqual(self.flaky.requests, seen)  # an open breaker is skipped
        self.flaky.failing = False
        wait_for(lambda: served_by("f") == "flaky", 15, "the breaker to close again")
        breakers = {b["name"]: b for b in gateway.health()["backends"]}  # type: ignore[union-attr]
        self.assertEqual(breakers["flaky"]["breaker"]["state"], "closed")  # type: ignore[index]

        # A stream that started is never retried elsewhere: killing its child cuts it.
        held = HeldStream(gateway)
        before = self.fallback.requests
        os.kill(_child_on_port(gateway, self.ports[0]), signal.SIGKILL)
        self.assertFalse(held.finish().complete)
        self.assertEqual(self.fallback.requests, before)
        # While child-a restarts, its model fails over to the fallback upstream.
        self.assertEqual(served_by("a"), "fallback")
        wait_for(lambda: served_by("a") == "a", 60, "child-a to serve again")

        # Reload adds a third model without dropping a running stream.
        held = HeldStream(gateway, max_tokens=3000)
        config.write_text(self.table(with_c=True))
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGHUP)
        wait_for(lambda: _status(gateway, "c") == 200, 60, "model c after the reload")
        response = held.finish()
        self.assertTrue(response.complete)
        self.assertEqual(served_by("c"), "c")


def _status(gateway: Gateway, model: str) -> int:
    response = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": model, "messages": [{"role": "user", "content": "x"}],
                                "max_tokens": 1})
    return response.status_code


def _child_on_port(gateway: Gateway, port: int) -> int:
    from tests.e2e.harness import alive, children_of

    assert gateway.process is not None
    for pid in children_of(gateway.process.pid):
        if alive(pid):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f"--port\x00{port}\x00".encode() in f.read():
                    return pid
    raise AssertionError(f"no child on port {port}")
