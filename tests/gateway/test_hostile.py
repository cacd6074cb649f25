"""Hostile and malformed input against the in-memory gateway: every row gets a clear JSON error.

Table-driven: each case is raw bytes from a client, the status and error code it must get, and
whether the connection must then be closed. Plus hypothesis-generated request heads and bodies:
never a 5xx, never an exception in the log, never anything but a JSON error or a proxied request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.gateway.cors import CorsPolicy
from tests.gateway.test_resource import KEY, GatewayFixture

AUTH = f"Authorization: Bearer {KEY}\r\n".encode()
CHAT = b'{"messages": [{"role": "user", "content": "hi"}]}'


def post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + extra
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    status: int
    code: str | int
    closed: bool


CASES = [
    Case("request line too long", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414,
         "uri_too_long", True),
    Case("request line too long, no end", b"GET /" + b"a" * 20000, 414, "uri_too_long", True),
    Case("header line too long", b"GET /ping HTTP/1.1\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
         431, "header_fields_too_large", True),
    Case("header line too long, no end", b"GET /ping HTTP/1.1\r\nX-Big: " + b"b" * 20000, 431,
         "header_fields_too_large", True),
    Case("too many headers",
         b"GET /ping HTTP/1.1\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(65)) + b"\r\n",
         431, "header_fields_too_large", True),
    Case("malformed content-length", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH
         + b"Content-Length: 12abc\r\n\r\n", 400, "bad_request", True),
    Case("negative content-length", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH
         + b"Content-Length: -5\r\n\r\n", 400, "bad_request", True),
    Case("empty content-length", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH
         + b"Content-Length: \r\n\r\n", 400, "bad_request", True),
    Case("conflicting content-lengths", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH
         + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400, "bad_request", True),
    Case("content-length and transfer-encoding",
         b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH
         + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
         "bad_request", True),
    Case("unsupported transfer-encoding", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
         + AUTH + b"Transfer-Encoding: gzip\r\n\r\n", 501, "unsupported_transfer_encoding", True),
    Case("garbage request line", b"HELLO\r\n\r\n", 400, "bad_request", True),
    Case("header without colon", b"GET /ping HTTP/1.1\r\nNoColonHere\r\n\r\n", 400, "bad_request",
         True),
    Case("body too large", post(b"/v1/chat/completions", b"x" * 2000), 413, "payload_too_large",
         True),
    Case("body not json", post(b"/v1/chat/completions", b"{not json"), 400, "invalid_json", False),
    Case("body json but not an object", post(b"/v1/chat/completions", b"[1, 2]"), 400,
         "invalid_json", False),
    Case("chat without messages", post(b"/v1/chat/completions", b'{"model": "x"}'), 400,
         "missing_required_parameter", False),
    Case("completion without prompt", post(b"/v1/completions", b"{}"), 400,
         "missing_required_parameter", False),
    Case("embeddings without input", post(b"/v1/embeddings", b"{}"), 400,
         "missing_required_parameter", False),
    Case("backend internals", b"GET /slots HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n", 404,
         "not_found", False),
    Case("backend props", b"GET /props HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n", 404,
         "not_found", False),
    Case("backend metrics via traversal", b"GET /v1/../metrics HTTP/1.1\r\nHost: x\r\n" + AUTH
         + b"\r\n", 404, "not_found", False),
    Case("percent-encoded route", b"POST /v1/%63hat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH
         + b"Content-Length: 0\r\n\r\n", 404, "not_found", False),
    Case("absolute-form target", b"GET http://elsewhere.example/v1/models HTTP/1.1\r\nHost: x\r\n"
         + AUTH + b"\r\n", 404, "not_found", False),
    Case("CONNECT", b"CONNECT elsewhere.example:443 HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n", 404,
         "not_found", False),
    Case("wrong method", b"DELETE /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n",
         405, "method_not_allowed", False),
    Case("no key with a body", post(b"/v1/chat/completions", CHAT).replace(AUTH, b""), 401,
         "invalid_api_key", True),
]


class HostileInputTests(SynchronousTestCase):
    def test_table(self) -> None:
        for case in CASES:
            gw = GatewayFixture(body_limit=1024)
            client = gw.client()
            client.send(case.raw)
            response = client.response()
            self.assertEqual(response.status, case.status, case.name)
            self.assertEqual(response.header("content-type"), "application/json", case.name)
            self.assertEqual(response.header("x-content-type-options"), "nosniff", case.name)
            body = response.json()
            self.assertEqual(body["error"]["code"], case.code, case.name)
            self.assertIn("message", body["error"])
            self.assertEqual(client.closed, case.closed, case.name)
            self.assertEqual(gw.agent.requests, [], case.name)
            if not case.closed:  # the connection stays usable
                before = len(client.written)
                client.send(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                self.assertIn(b"HTTP/1.1 200", client.written[before:], case.name)

    def test_limits_at_the_boundary_are_allowed(self) -> None:
        gw = GatewayFixture(body_limit=1024)
        line = b"GET /ping?" + b"a" * (8192 - len(b"GET /ping? HTTP/1.1\r\n")) + b" HTTP/1.1\r\n"
        self.assertEqual(len(line), 8192)
        client = gw.client()
        client.send(line + b"\r\n")
        self.assertEqual(client.response().status, 200)
        client = gw.client()
        client.send(b"GET /ping HTTP/1.1\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(64))
                    + b"\r\n")
        self.assertEqual(client.response().status, 200)

    def test_limits_are_configurable(self) -> None:
        gw = GatewayFixture(limits={"max_request_line": 100, "max_headers": 2})
        client = gw.client()
        client.send(b"GET /" + b"a" * 100 + b" HTTP/1.1\r\n\r\n")
        self.assertEqual(client.response().json()["error"]["message"],
                         "Request line too long (max 100 bytes)")
        client = gw.client()
        client.send(b"GET /ping HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")
        self.assertEqual(client.response().status, 431)

    def test_other_clients_are_unaffected(self) -> None:
        gw = GatewayFixture(body_limit=1024)
        bad = [gw.client() for _ in range(20)]
        good = gw.client()
        good.request("POST", "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {KEY}"})
        for client, case in zip(bad, CASES, strict=False):
            client.send(case.raw)
        gw.agent.requests[0].respond(200, b'{"ok": true}')
        self.assertEqual(good.response().status, 200)


_TOKENS = st.sampled_from([
    b"GET", b"POST", b"OPTIONS", b"DELETE", b"/v1/chat/completions", b"/ping", b"/health", b"/",
    b"/v1/models", b"/slots", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9", b" ", b"  ", b"\t", b":", b"%",
    b"..", b"?", b"\x00", b"\xff", b"Content-Length", b"Transfer-Encoding", b"chunked", b"-1",
    b"999999999999", b"0", b"Authorization", b"Bearer", KEY.encode(), b"Origin", b"{", b"}",
])
_LINE = st.lists(st.one_of(_TOKENS, st.binary(max_size=12)), max_size=8).map(b"".join)


class FuzzTests(SynchronousTestCase):
    @settings(max_examples=300)
    @given(st.lists(_LINE, max_size=6), st.binary(max_size=64), st.booleans())
    def test_any_request_gets_a_sane_answer(
        self, lines: list[bytes], body: bytes, crlf: bool
    ) -> None:
        gw = GatewayFixture(body_limit=1024)
        client = gw.client()
        sep = b"\r\n" if crlf else b"\n"
        client.send(sep.join(lines) + sep + sep + body)
        written = client.written
        if written:
            response = client.response()
            self.assertLess(response.status, 500)
            if response.status >= 400:
                self.assertIn("error", response.json())
        for record in gw.agent.requests:  # anything that got through is a real API request
            self.assertTrue(record.uri.startswith(b"http://127.0.0.1:9/v1/"), record.uri)
        self.assertEqual(self.flushLoggedErrors(), [])

    @settings(max_examples=200)
    @given(st.binary(max_size=200))
    def test_any_body_to_chat(self, body: bytes) -> None:
        gw = GatewayFixture(body_limit=1024)
        client = gw.client()
        client.send(post(b"/v1/chat/completions", body))
        if gw.agent.requests:
            parsed = json.loads(body)
            self.assertIsInstance(parsed["messages"], list)
        else:
            self.assertEqual(client.response().status, 400)


class CorsTests(SynchronousTestCase):
    """The matrix: disabled / wildcard / allowlist by allowed / unknown / over-long origin by
    preflight / success / error (gateway-made and rejected before the body)."""

    ALLOWED = "https://app.example"

    def run_case(self, policy: CorsPolicy, origin: str | None, kind: str) -> dict[str, str | None]:
        gw = GatewayFixture(body_limit=1024, cors=policy)
        client = gw.client()
        headers = {"Origin": origin} if origin is not None else {}
        if kind == "preflight":
            client.request("OPTIONS", "/v1/chat/completions", headers={
                **headers, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
        elif kind == "success":
            client.request("POST", "/v1/chat/completions", CHAT,
                           {**headers, "Authorization": f"Bearer {KEY}"})
            gw.agent.requests[0].respond(200, b"{}", _backend_cors())
        elif kind == "error":
            client.request("GET", "/v1/models", headers=headers)  # 401
        elif kind == "early":
            client.request("POST", "/v1/chat/completions", CHAT, headers)  # 401 before body
        response = client.response()
        names = ("access-control-allow-origin", "access-control-allow-methods",
                 "access-control-allow-headers", "access-control-max-age", "vary",
                 "access-control-expose-headers")
        result = {name: response.header(name) for name in names}
        result["status"] = str(response.status)
        return result

    def test_matrix(self) -> None:
        policies = {
            "disabled": CorsPolicy(),
            "wildcard": CorsPolicy.from_entries(["*"]),
            "allowlist": CorsPolicy.from_entries([self.ALLOWED + "/", "http://other.example"]),
        }
        origins = {"allowed": self.ALLOWED, "unknown": "https://evil.example",
                   "suffix": self.ALLOWED + ".evil.example",
                   "long": "https://" + "a" * 2050 + ".example", "none": None}
        for pname, policy in policies.items():
            for oname, origin in origins.items():
                for kind in ("preflight", "success", "error", "early"):
                    label = f"{pname}/{oname}/{kind}"
                    got = self.run_case(policy, origin, kind)
                    expected_status = {"preflight": "204", "success": "200", "error": "401",
                                       "early": "401"}[kind]
                    self.assertEqual(got["status"], expected_status, label)
                    if pname == "wildcard":
                        want = "*"
                    elif pname == "allowlist" and oname == "allowed":
                        want = self.ALLOWED
                    else:
                        want = None
                    self.assertEqual(got["access-control-allow-origin"], want, label)
                    if want is None:
                        self.assertEqual(
                            [k for k, v in got.items() if k.startswith("access-") and v], [], label
                        )
                        continue
                    self.assertEqual(got["vary"], "Origin" if pname == "allowlist" else None, label)
                    if kind == "preflight":
                        self.assertEqual(got["access-control-allow-methods"], "GET, POST, OPTIONS")
                        self.assertEqual(got["access-control-max-age"], "86400")
                        self.assertEqual(got["access-control-allow-headers"],
                                         "authorization, content-type, x-stainless-os")
                    else:
                        self.assertIn("Retry-After", got["access-control-expose-headers"] or "")

    def test_scheme_warning(self) -> None:
        policy = CorsPolicy.from_entries(["app.example", "https://ok.example/"])
        self.assertEqual(len(policy.warnings()), 1)
        self.assertIn("app.example", policy.warnings()[0])

    def test_malformed_requested_headers_fall_back(self) -> None:
        policy = CorsPolicy.from_entries(["*"])
        headers = dict(policy.preflight_headers(b"https://x", b"bad\r\nheader"))
        self.assertEqual(headers[b"Access-Control-Allow-Headers"],
                         b"Authorization, Content-Type, X-Api-Key, X-Request-ID")


def _backend_cors():  # type: ignore[no-untyped-def]
    from twisted.web.http_headers import Headers

    return Headers({b"access-control-allow-origin": [b"https://evil.example"],
                    b"access-control-allow-credentials": [b"true"],
                    b"content-type": [b"application/json"]})


