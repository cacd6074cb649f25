"""The real twistd in front of an external backend (BACKEND_URL) that refuses connections.

Issue 16.3 / 24.1: an external backend refusing connections is answered at once with a 502
that says so (not after QUEUE_TIMEOUT with "the backend is starting"), /health says
``unreachable``, and each refused send is counted with its reason (24.5).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import httpx
from twisted.trial.unittest import TestCase

from tests.e2e.harness import API_KEY, Gateway, free_port, wait_for

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
#: Far longer than any of these answers may take: a request held for it would time out here.
QUEUE_TIMEOUT = 60
CLIENT_TIMEOUT = QUEUE_TIMEOUT / 4


def fake_backend(port: int) -> subprocess.Popen[bytes]:
    """bench/fake_backend.py as its own process (so it can be killed like a real server)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.fake_backend", "--port", str(port), "--events", "2",
         "--interval-ms", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(listening, 20, "the fake backend")
    return process


class UnreachableBackendTests(TestCase):
    def gateway(self, backend_port: int) -> Gateway:
        gw = Gateway(env={
            "BACKEND_URL": f"http://127.0.0.1:{backend_port}",
            "QUEUE_TIMEOUT": str(QUEUE_TIMEOUT),
            "METRICS_AUTH_ENABLED": "false",
        })
        self.addCleanup(gw.stop)
        return gw

    def backend_state(self, gw: Gateway) -> object:
        try:
            return gw.health()["backend"]["state"]  # type: ignore[index]
        except httpx.TransportError:
            return None

    def chat(self, gw: Gateway) -> httpx.Response:
        return httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers=AUTH,
                          timeout=CLIENT_TIMEOUT)

    def test_refusing_backend_url_is_answered_at_once(self) -> None:
        gw = self.gateway(free_port()).start(wait_ready=False)
        wait_for(lambda: self.backend_state(gw) == "unreachable", 30, "state unreachable")
        response = self.chat(gw)  # httpx.ReadTimeout if held until QUEUE_TIMEOUT
        self.assertEqual(response.status_code, 502)
        self.assertEqual(response.json()["error"]["code"], "backend_unreachable")
        self.assertIn("connection refused", response.json()["error"]["message"])
        self.assertEqual(httpx.get(f"{gw.url}/readyz", timeout=5).status_code, 503)
        self.assertEqual(gw.health()["status"], "unavailable")

    def test_killed_backend_fails_fast_is_counted_and_comes_back(self) -> None:
        port = free_port()
        backend = fake_backend(port)
        self.addCleanup(lambda: backend.poll() is None and backend.kill())
        gw = self.gateway(port).start()
        self.assertEqual(self.chat(gw).status_code, 200)

        backend.send_signal(signal.SIGKILL)
        backend.wait()
        statuses = [self.chat(gw).status_code for _ in range(5)]
        self.assertEqual(statuses, [502] * 5)
        self.assertEqual(self.backend_state(gw), "unreachable")
        self.assertEqual(httpx.get(f"{gw.url}/readyz", timeout=5).status_code, 503)

        metrics = httpx.get(f"{gw.url}/metrics", headers={"Accept": "text/plain"}, timeout=5).text
        counted = re.search(
            r'llamaproxy_backend_attempts_total\{backend="[^"]+",outcome="failure",'
            r'reason="refused"\} (\d+)', metrics)
        self.assertIsNotNone(counted, metrics[-3000:])
        assert counted is not None
        warned = gw.log_text().count("request failed (refused)")
        self.assertGreaterEqual(warned, 1)
        self.assertEqual(int(float(counted.group(1))), warned)
        # The older gateway's /health fields (16.11): its counters under gateway.metrics.
        self.assertIn("requests_total", gw.health()["gateway"]["metrics"])  # type: ignore[index]

        backend = fake_backend(port)
        wait_for(lambda: self.backend_state(gw) == "ready", 10, "the backend to be ready again")
        self.assertEqual(self.chat(gw).status_code, 200)
