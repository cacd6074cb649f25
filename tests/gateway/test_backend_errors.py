"""Backend errors that are not JSON become OpenAI-shaped JSON errors; /readyz's body agrees with
its status (issue 16.10)."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llamaproxy.backends.backend import BackendState, ProbeResult
from tests.gateway.test_resource import GatewayFixture


class PlainErrorTests(SynchronousTestCase):
    def test_bare_text_error_is_wrapped_with_the_backends_status(self) -> None:
        gw = GatewayFixture()
        client = gw.chat()
        gw.agent.requests[0].respond(
            413, b"Payload Too Large", Headers({b"Content-Type": [b"text/plain"]}))
        response = client.response()
        self.assertEqual(response.status, 413)
        self.assertEqual(response.header("content-type"), "application/json")
        error = response.json()["error"]
        self.assertEqual(error["code"], "backend_error")
        self.assertEqual(error["type"], "invalid_request_error")
        self.assertEqual(error["message"],
                         "Backend answered 413 Content Too Large: Payload Too Large")

    def test_empty_5xx_body_is_wrapped(self) -> None:
        gw = GatewayFixture()
        client = gw.chat()
        gw.agent.requests[0].respond(500, b"")
        response = client.response()
        self.assertEqual(response.status, 500)
        self.assertEqual(response.json()["error"],
                         {"message": "Backend answered 500 Internal Server Error",
                          "type": "server_error", "code": "backend_error"})

    def test_json_errors_pass_through_unchanged(self) -> None:
        gw = GatewayFixture()
        client = gw.chat()
        body = b'{"error": {"code": 400, "message": "bad", "type": "invalid_request_error"}}'
        gw.agent.requests[0].respond(
            400, body, Headers({b"Content-Type": [b"application/json; charset=utf-8"]}))
        response = client.response()
        self.assertEqual(response.status, 400)
        self.assertEqual(response.body, body)


class ReadyzTests(SynchronousTestCase):
    def test_body_agrees_with_status_when_the_backend_stops_answering(self) -> None:
        gw = GatewayFixture()
        gw.backend.set_state(BackendState.READY)
        gw.backend.last_probe = ProbeResult(1.0, "down", "timed out")  # e.g. SIGSTOPped
        client = gw.client()
        client.request("GET", "/readyz", b"", {})
        response = client.response()
        self.assertEqual(response.status, 503)
        self.assertEqual(json.loads(response.body),
                         {"ready": False, "backend": "unresponsive"})
        gw.backend.last_probe = ProbeResult(2.0, "ready")
        client = gw.client()
        client.request("GET", "/readyz", b"", {})
        self.assertEqual(json.loads(client.response().body), {"ready": True, "backend": "ready"})
