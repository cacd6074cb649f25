"""Tests for llamaproxy.admin.resource (and the page and view it renders), in memory with treq's
StubTreq: login, sessions, CSRF, restart, the JSON and SSE live data, security headers."""

from __future__ import annotations

import json
from http.cookiejar import CookieJar, DefaultCookiePolicy
from http.cookies import SimpleCookie
from typing import Any

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, _SynchronousProducer
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.admin.resource import MAX_STREAMS, TICK, AdminResource
from llamaproxy.auth.keys import parse_keys
from tests.admin.fixtures import ADMIN_KEY, BACKEND_KEY, USER_KEY, PageWorld, entry

BASE = "http://admin.example"


class Response:
    """A finished response: code, headers (lower-case names), body, cookies set."""

    def __init__(self, code: int, headers: dict[str, list[str]], body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body
        self.text = body.decode("utf-8")
        self.cookies = SimpleCookie()
        for value in headers.get("set-cookie", []):
            self.cookies.load(value)

    def header(self, name: str) -> str:
        return self.headers[name.lower()][0]


class AdminResourceTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = PageWorld()
        self.resource = AdminResource(self.world.dashboard, self.world.sessions,
                                      self.world.operations, self.world.clock)
        agent = RequestTraversalAgent(self.resource)
        # Cookies are sent by hand (self.cookies): a jar that keeps none.
        self.treq = HTTPClient(agent, cookiejar=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
                               data_to_body_producer=_SynchronousProducer)
        self.treq.flush = agent.flush  # type: ignore[attr-defined]
        self.cookies: dict[str, str] = {}

    def call(self, method: str, path: str, form: dict[str, str] | None = None) -> Response:
        headers = {}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        d = self.treq.request(method, BASE + path, data=form, headers=headers,
                              allow_redirects=False)
        self.treq.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        raw = {k.decode().lower(): [v.decode() for v in vs]
               for k, vs in response.headers.getAllRawHeaders()}
        result = Response(response.code, raw, body)
        for name, morsel in result.cookies.items():
            if morsel["max-age"] == "0":
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = morsel.value
        return result

    def log_in(self, key: str = ADMIN_KEY) -> Response:
        form = self.call("GET", "/")
        token = form.text.split('name="login" value="', 1)[1].split('"', 1)[0]
        return self.call("POST", "/login", {"login": token, "api_key": key})

    def csrf(self) -> str:
        page = self.call("GET", "/")
        return page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]


class LoginTests(AdminResourceTestCase):
    def test_login_form_without_a_session(self) -> None:
        response = self.call("GET", "/")
        self.assertEqual(response.code, 200)
        self.assertIn("Admin API key", response.text)
        self.assertNotIn("page.js", response.text)
        morsel = response.cookies["llamaproxy_login"]
        self.assertTrue(morsel["httponly"])
        self.assertEqual(morsel["samesite"].lower(), "strict")

    def test_admin_login_sets_the_session_cookie(self) -> None:
        response = self.log_in()
        self.assertEqual(response.code, 303)
        self.assertEqual(response.header("Location"), "/")
        morsel = response.cookies["llamaproxy_admin"]
        self.assertTrue(morsel["httponly"])
        self.assertEqual(morsel["samesite"].lower(), "strict")
        self.assertEqual(morsel["max-age"], "600")
        self.assertFalse(morsel["secure"])  # plain HTTP here; set on TLS endpoints
        page = self.call("GET", "/")
        self.assertIn("Logged in with key 'boss'", page.text)
        self.assertIn('src="/static/page.js"', page.text)

    def test_non_admin_key_refused(self) -> None:
        response = self.log_in(USER_KEY)
        self.assertEqual(response.code, 403)
        self.assertIn("Key 'alice' is not an admin key", response.text)
        self.assertNotIn("llamaproxy_admin", self.cookies)
        self.assertEqual(self.call("GET", "/state.json").code, 401)

    def test_login_needs_the_form_token(self) -> None:
        self.call("GET", "/")
        response = self.call("POST", "/login", {"login": "forged", "api_key": ADMIN_KEY})
        self.assertEqual(response.code, 400)
        self.assertNotIn("llamaproxy_admin", self.cookies)

    def test_logout(self) -> None:
        self.log_in()
        refused = self.call("POST", "/logout", {"csrf": "wrong"})
        self.assertEqual(refused.code, 403)
        response = self.call("POST", "/logout", {"csrf": self.csrf()})
        self.assertEqual(response.code, 303)
        self.assertEqual(self.call("GET", "/state.json").code, 401)
        self.assertIn("Admin API key", self.call("GET", "/").text)

    def test_key_reload_ends_the_session(self) -> None:
        self.log_in()
        self.world.keys = parse_keys([f"alice:{USER_KEY}"])[0]
        self.assertEqual(self.call("GET", "/fragments").code, 401)


class PageTests(AdminResourceTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.log_in()

    def test_security_headers_everywhere(self) -> None:
        for method, path in (("GET", "/"), ("GET", "/state.json"), ("GET", "/nope"),
                             ("GET", "/static/page.js")):
            response = self.call(method, path)
            csp = response.header("Content-Security-Policy")
            self.assertIn("script-src 'self'", csp)
            self.assertIn("frame-ancestors 'none'", csp)
            self.assertEqual(response.header("X-Frame-Options"), "DENY")
            self.assertEqual(response.header("Cache-Control"), "no-store")
            self.assertEqual(response.header("Server"), "llamaproxy")

    def test_an_error_is_a_json_500_and_logged(self) -> None:
        def broken(*args: object) -> None:
            raise RuntimeError("boom")

        self.world.dashboard.snapshot = broken  # type: ignore[method-assign]
        response = self.call("GET", "/state.json")
        self.assertEqual(response.code, 500)
        self.assertEqual(json.loads(response.body)["error"]["code"], 500)
        self.assertNotIn("boom", response.text)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_static_files(self) -> None:
        script = self.call("GET", "/static/page.js")
        self.assertEqual(script.header("Content-Type"), "text/javascript; charset=utf-8")
        self.assertIn("EventSource", script.text)
        style = self.call("GET", "/static/page.css")
        self.assertEqual(style.header("Content-Type"), "text/css; charset=utf-8")

    def test_not_found_and_method(self) -> None:
        self.assertEqual(self.call("GET", "/nope").code, 404)
        self.assertEqual(self.call("DELETE", "/").code, 405)
        big = self.call("POST", "/restart", {"csrf": "x" * 20000})
        self.assertEqual(big.code, 413)

    def test_page_shows_everything_without_secrets(self) -> None:
        world = self.world
        world.activity.add(entry("alice", "tiny"), queue_wait=0.25, stream=True)
        world.activity.add(entry("carol", "big", status=429, completion_tokens=None))
        world.child_logs.add("local", f"srv using key {BACKEND_KEY}")
        world.child_logs.add("local", 'request: {"prompt": "the secret prompt"}')
        world.router.members["local"].load.active = 1  # type: ignore[union-attr]
        world.sampler.start()
        self.addCleanup(world.sampler.stop)
        world.clock.advance(5)
        page = self.call("GET", "/").text
        for text in ("local", "upstream", "1/2", "ready", "closed", "alice", "carol", "429",
                     "250 ms", "<svg", "requests/s", "p95 TTFT"):
            self.assertIn(text, page)
        for secret in (BACKEND_KEY, ADMIN_KEY, USER_KEY, "the secret prompt"):
            self.assertNotIn(secret, page)
        self.assertEqual(page.count('class="restart"'), 1)  # the remote upstream has none
        self.assertIn("does not have yet", page)
        state = self.call("GET", "/state.json")
        document = json.loads(state.body)
        self.assertEqual([b["name"] for b in document["backends"]], ["local", "upstream"])
        self.assertEqual(document["backends"][0]["busy"], 1)
        self.assertTrue(document["backends"][0]["restartable"])
        self.assertEqual(document["activity"][0]["key_id"], "carol")
        self.assertEqual(len(document["series"]), 1)
        for secret in (BACKEND_KEY, ADMIN_KEY, USER_KEY, "the secret prompt"):
            self.assertNotIn(secret, state.text)

    def test_activity_filters(self) -> None:
        self.world.activity.add(entry("alice", "tiny"))
        self.world.activity.add(entry("bob", "big"))
        page = self.call("GET", "/?key=bob").text
        activity = page.split('id="frag-activity"', 1)[1].split("</table>", 1)[0]
        self.assertIn("<td>bob</td>", activity)
        self.assertNotIn("<td>alice</td>", activity)
        self.assertIn('<option value="bob" selected="selected">', page)
        state = json.loads(self.call("GET", "/state.json?model=tiny").body)
        self.assertEqual([a["key_id"] for a in state["activity"]], ["alice"])

    def test_queued_keys_and_last_error(self) -> None:
        member = self.world.router.members["local"]
        member.load.acquire("alice")  # type: ignore[union-attr]
        member.load.acquire("alice")  # type: ignore[union-attr]
        member.load.acquire("dave")  # type: ignore[union-attr]
        member.status.last_exit = "exit code 1: bad model"
        document = json.loads(self.call("GET", "/state.json").body)
        self.assertEqual(document["backends"][0]["queued"], 1)
        self.assertEqual(document["backends"][0]["last_error"], "exit code 1: bad model")
        self.assertEqual(document["keys"], [{"key_id": "dave", "requests_per_minute": 0,
                                             "tokens_per_minute": 0, "queued": 1,
                                             "rate_limited_per_minute": 0}])


class RestartTests(AdminResourceTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.log_in()

    def test_needs_csrf(self) -> None:
        response = self.call("POST", "/restart", {"backend": "local", "confirm": "yes"})
        self.assertEqual(response.code, 403)
        self.assertEqual(self.world.child.restarts, 0)

    def test_asks_for_confirmation_first(self) -> None:
        response = self.call("POST", "/restart", {"backend": "local", "csrf": self.csrf()})
        self.assertEqual(response.code, 200)
        self.assertIn("Restart backend 'local'?", response.text)
        self.assertIn('name="confirm" value="yes"', response.text)
        self.assertEqual(self.world.child.restarts, 0)

    def test_restarts(self) -> None:
        response = self.call("POST", "/restart",
                             {"backend": "local", "csrf": self.csrf(), "confirm": "yes"})
        self.assertEqual(response.code, 303)
        self.assertEqual(response.header("Location"), "/?restarted=local")
        self.assertEqual(self.world.child.restarts, 1)
        self.assertIn("Backend 'local' is restarting.", self.call("GET", response.header(
            "Location")).text)
        self.assertNotIn('class="notice"', self.call("GET", "/?restarted=<b>x</b>").text)

    def test_cannot_restart(self) -> None:
        csrf = self.csrf()
        for backend in ("upstream", "nobody"):
            response = self.call("POST", "/restart",
                                 {"backend": backend, "csrf": csrf, "confirm": "yes"})
            self.assertEqual(response.code, 409)
            self.assertIn("not a supervised llama-server child", response.text)
        self.world.child.stopping = True
        response = self.call("POST", "/restart", {"backend": "local", "csrf": csrf,
                                                  "confirm": "yes"})
        self.assertEqual(response.code, 409)
        self.assertIn("stopping", response.text)

    def test_needs_a_session(self) -> None:
        self.cookies.pop("llamaproxy_admin")
        response = self.call("POST", "/restart", {"backend": "local", "confirm": "yes"})
        self.assertEqual(response.code, 401)


class LiveTests(AdminResourceTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.log_in()

    def open_stream(self) -> tuple[Any, list[bytes]]:
        chunks: list[bytes] = []
        headers = {"Cookie": f"llamaproxy_admin={self.cookies['llamaproxy_admin']}"}
        d = self.treq.get(BASE + "/events", headers=headers)
        self.treq.flush()
        response = self.successResultOf(d)
        from treq import collect

        done = collect(response, chunks.append)
        return response, chunks, done  # type: ignore[return-value]

    def events(self, chunks: list[bytes]) -> list[str]:
        return [block for block in b"".join(chunks).decode().split("\n\n") if block]

    def test_fragments(self) -> None:
        document = json.loads(self.call("GET", "/fragments").body)
        self.assertEqual(set(document["sections"]),
                         {"backends", "chart", "activity", "keys", "logs"})
        self.assertIn("local", document["sections"]["backends"])

    def test_updates_every_tick_while_open_and_nothing_when_closed(self) -> None:
        live = self.resource.live
        self.assertFalse(live.running)
        response, chunks, done = self.open_stream()  # type: ignore[misc]
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"text/event-stream; charset=utf-8"])
        self.assertEqual(self.events(chunks)[0], "retry: 3000")
        self.assertEqual(len(self.events(chunks)), 2)
        self.assertTrue(live.running)
        self.world.activity.add(entry("zed", "tiny"))
        self.world.clock.advance(TICK)
        self.treq.flush()
        events = self.events(chunks)
        self.assertEqual(len(events), 3)
        self.assertIn("zed", json.loads(events[-1][len("data: "):])["sections"]["activity"])
        # The session ends (its key was removed): a logout event, the stream closes.
        self.world.keys = parse_keys([f"alice:{USER_KEY}"])[0]
        self.world.clock.advance(TICK)
        self.treq.flush()
        self.assertEqual(self.events(chunks)[-1], "event: logout\ndata: {}")
        self.successResultOf(done)
        self.assertFalse(live.running)
        self.assertEqual(live.streams, [])

    def test_paused_stream_skips_updates(self) -> None:
        _, chunks, _ = self.open_stream()  # type: ignore[misc]
        stream = self.resource.live.streams[0]
        stream.pauseProducing()
        self.world.clock.advance(TICK)
        self.treq.flush()
        self.assertEqual(len(self.events(chunks)), 2)
        stream.resumeProducing()
        self.world.clock.advance(TICK)
        self.treq.flush()
        self.assertEqual(len(self.events(chunks)), 3)
        self.resource.live.close_all()
        self.assertFalse(self.resource.live.running)

    def test_stream_limit(self) -> None:
        for _ in range(MAX_STREAMS):
            self.open_stream()
        response = self.call("GET", "/events")
        self.assertEqual(response.code, 503)
        self.resource.live.close_all()

    def test_events_need_a_session(self) -> None:
        self.cookies.clear()
        self.assertEqual(self.call("GET", "/events").code, 401)
