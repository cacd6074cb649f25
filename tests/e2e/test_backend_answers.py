"""What clients see of a misbehaving real llama-server (issue 16.10, as observed).

A SIGSTOPped llama-server child made /readyz answer 503 with
``"backend": "ready"`` in its body. The body must agree with the status."""

from __future__ import annotations

import os
import signal

import httpx
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.harness import Gateway, wait_for


class StoppedBackendTests(SynchronousTestCase):
    def test_readyz_body_agrees_with_its_status(self) -> None:
        gateway = Gateway(env={"PROBE_INTERVAL": "0.5", "HEALTH_TIMEOUT": "0.5"})
        gateway.start()
        self.addCleanup(gateway.stop)
        child = gateway.child_pid()
        os.kill(child, signal.SIGSTOP)
        self.addCleanup(lambda: os.kill(child, signal.SIGCONT))
        answers: list[tuple[int, dict[str, object]]] = []

        def not_ready() -> bool:
            response = httpx.get(f"{gateway.url}/readyz", timeout=5)
            answers.append((response.status_code, response.json()))
            return response.status_code == 503

        wait_for(not_ready, 30, "/readyz to say 503 for the stopped child")
        status, body = answers[-1]
        self.assertEqual(body["ready"], False)
        self.assertNotEqual(body["backend"], "ready")
        for status, body in answers:  # never a 503 that says ready, nor a 200 that says not
            self.assertEqual(status == 200, body["ready"] is True and body["backend"] == "ready")
        os.kill(child, signal.SIGCONT)
        wait_for(lambda: httpx.get(f"{gateway.url}/readyz", timeout=5).status_code == 200, 30,
                 "/readyz to recover once the child runs again")


class PlainBackendErrorTests(SynchronousTestCase):
    """Issue 16.10, as observed: llama-server answers a large form-encoded body with a bare 413
    (no body); through the gateway the client gets an OpenAI-shaped JSON error, status kept."""

    def test_bare_413_from_the_real_llama_server_is_wrapped(self) -> None:
        from tests.e2e.harness import API_KEY, shared_gateway

        gateway = shared_gateway()
        body = ('{"messages": [{"role": "user", "content": "' + "x" * (1 << 20) + '"}]}').encode()
        response = httpx.post(
            f"{gateway.url}/v1/chat/completions", content=body, timeout=60,
            headers={"Authorization": f"Bearer {API_KEY}",
                     "Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual(response.status_code, 413)
        self.assertEqual(response.headers["content-type"], "application/json")
        error = response.json()["error"]
        self.assertEqual(error["code"], "backend_error")


class StreamConnectionTests(SynchronousTestCase):
    """llama-server closes its connection after a streamed response although it answered
    "Keep-Alive": found when three gateways streamed back to back (a request sent on such a
    connection got 502, since a POST written whole is never sent again). Streams now go with
    ``Connection: close``; back-to-back streams all succeed."""

    def test_back_to_back_streams(self) -> None:
        from tests.e2e.harness import API_KEY, shared_gateway

        gateway = shared_gateway()
        statuses = []
        with httpx.Client(timeout=60) as client:
            for i in range(30):
                with client.stream("POST", f"{gateway.url}/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": f"n{i}"}], "max_tokens": 4,
                        "stream": True}, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
                    r.read()
                    statuses.append(r.status_code)
        self.assertEqual(statuses, [200] * 30)
