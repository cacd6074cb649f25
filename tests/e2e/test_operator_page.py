"""The operator page (ADMIN_LISTEN) in a real browser: headless Debian Chromium via Selenium, on
the real ``twistd llamaproxy`` supervising a real llama-server.

Checks login, refusal of a non-admin key, live updates arriving while a stream runs, the restart
button's confirmation and effect, the polling fallback, the page without JavaScript, and that a
key removed by a reload ends the session. Screenshots go to ``artifacts/screenshots/``.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from typing import Any

import httpx
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.admin.resource import MAX_STREAMS
from tests.e2e.browser import chromium, screenshot
from tests.e2e.harness import API_KEY, Gateway, free_port, wait_for

ADMIN_KEY = "sk-admin-e2e-0123456789abcdef"
TEAM_KEY = "sk-team-e2e-0123456789abcdef"
KEYS = f"# e2e keys\ntester:{API_KEY}\nboss:{ADMIN_KEY}\nteam:{TEAM_KEY}:4\n"

_gateway: Gateway | None = None


def page_gateway() -> Gateway:
    """One gateway with the operator page for this module, stopped at exit."""
    global _gateway
    if _gateway is None or _gateway.process is None or _gateway.process.poll() is not None:
        gateway = Gateway(env={
            "ADMIN_KEY_IDS": "boss",
            "KEYS_RELOAD_INTERVAL": "0.5",
        })
        gateway.admin_port = free_port()  # type: ignore[attr-defined]
        gateway.env["ADMIN_LISTEN"] = f"tcp:{gateway.admin_port}:interface=127.0.0.1"  # type: ignore[attr-defined]
        gateway.keys_file.write_text(KEYS)
        _gateway = gateway.start()
        atexit.register(gateway.stop)
    return _gateway


def admin_url(gateway: Gateway, path: str = "/") -> str:
    return f"http://127.0.0.1:{gateway.admin_port}{path}"  # type: ignore[attr-defined]


def wait_page(driver: Any, predicate: Any, timeout: float, what: str) -> None:
    """Poll ``predicate(driver)`` (exceptions count as not yet) until true."""
    def check() -> bool:
        try:
            return bool(predicate(driver))
        except Exception:
            return False

    wait_for(check, timeout, what, interval=0.1)


def text_of(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, element_id).text)


def log_in(driver: Any, gateway: Gateway, key: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(admin_url(gateway))
    field = driver.find_element(By.NAME, "api_key")
    field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()


def open_stream(gateway: Gateway, max_tokens: int = 3500) -> socket.socket:
    """A streamed completion whose client reads its first events and then stops reading: the
    backend's slot stays busy (backpressure) until the socket is closed."""
    body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": max_tokens,
                       "temperature": 0, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    received = b""
    while received.count(b"data: ") < 3:
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"the stream ended early: {received!r}")
        received += chunk
    return sock


#: scripts/test.sh runs this module as its own slow group, after the main run.
SLOW_GROUP = (
    "runs in scripts/test.sh's browser slow group"
    if os.environ.get("LLAMAPROXY_BROWSER_TESTS") == "slow-group" else None
)


class OperatorPageBrowserTests(SynchronousTestCase):
    """The page in headless Chromium."""

    skip = SLOW_GROUP

    def setUp(self) -> None:
        self.gateway = page_gateway()
        self.driver = chromium()
        self.addCleanup(self.driver.quit)

    def test_non_admin_key_is_refused(self) -> None:
        log_in(self.driver, self.gateway, API_KEY)
        wait_page(self.driver, lambda d: "not an admin key" in d.page_source, 10,
                  "the refusal")
        self.assertIn("Key 'tester' is not an admin key", self.driver.page_source)
        self.assertIsNone(self.driver.get_cookie("llamaproxy_admin"))
        screenshot(self.driver, "operator-page-refused")
        # The live data is refused too without a session.
        response = httpx.get(admin_url(self.gateway, "/state.json"))
        self.assertEqual(response.status_code, 401)
        self.assertEqual(response.json()["error"]["type"], "authentication_error")

    def test_login_and_live_updates_while_a_stream_runs(self) -> None:
        log_in(self.driver, self.gateway, ADMIN_KEY)
        wait_page(self.driver, lambda d: "Live (Server-Sent Events)" in text_of(d, "live-status"),
                  20, "live updates over SSE")
        cookie = self.driver.get_cookie("llamaproxy_admin")
        self.assertTrue(cookie["httpOnly"])
        self.assertEqual(cookie["sameSite"], "Strict")
        self.assertIn("Logged in with key 'boss'", self.driver.page_source)
        sock = open_stream(self.gateway)
        try:
            # The busy slot appears without a reload...
            wait_page(self.driver, lambda d: "1/1" in text_of(d, "frag-backends"), 20,
                      "the busy slot to show up live")
            first = self.driver.find_element("tag name", "body").get_attribute("data-updated")
            # ... and updates keep arriving while the stream is still open.
            wait_page(self.driver, lambda d: d.find_element("tag name", "body")
                      .get_attribute("data-updated") != first, 10, "a further live update")
            self.assertIn("1/1", text_of(self.driver, "frag-backends"))
            screenshot(self.driver, "operator-page-streaming")
        finally:
            sock.close()
        wait_page(self.driver, lambda d: "0/1" in text_of(d, "frag-backends"), 30,
                  "the slot to be free again")
        # The cut stream shows in the activity table: key, model, client gone.
        wait_page(self.driver, lambda d: "tester" in text_of(d, "frag-activity")
                  and "yes" in text_of(d, "frag-activity"), 20, "the stream in the activity")
        wait_page(self.driver, lambda d: "tester" in text_of(d, "frag-keys"), 20,
                  "the key in the keys table")
        wait_page(self.driver, lambda d: "llama-server" in text_of(d, "frag-logs")
                  or "srv" in text_of(d, "frag-logs"), 20, "the child's log")
        self.assertNotIn(API_KEY, self.driver.page_source)
        self.assertNotIn(ADMIN_KEY, self.driver.page_source)
        self.assertNotIn(self.gateway.backend_key(), self.driver.page_source)
        self.assertNotIn("Hello", text_of(self.driver, "frag-logs"))
        screenshot(self.driver, "operator-page-after-stream")

    def test_under_load_for_the_docs(self) -> None:
        """Twenty seconds of traffic from two keys (one over its rate limit): the charts, the
        activity and the keys fill in live. Its screenshot is docs/images/operator-page.png."""
        log_in(self.driver, self.gateway, ADMIN_KEY)
        wait_page(self.driver, lambda d: "Live (Server-Sent" in text_of(d, "live-status"), 20,
                  "live updates over SSE")
        statuses: list[int] = []
        deadline = time.monotonic() + 20
        with httpx.Client(base_url=self.gateway.url, timeout=60) as client:
            turn = 0
            while time.monotonic() < deadline:
                turn += 1
                key = TEAM_KEY if turn % 3 == 0 else API_KEY
                body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                        "max_tokens": 48, "temperature": 0, "stream": turn % 2 == 0,
                        "stream_options": {"include_usage": True}}
                if not body["stream"]:
                    del body["stream_options"]
                response = client.post("/v1/chat/completions", json=body,
                                        headers={"Authorization": f"Bearer {key}"})
                statuses.append(response.status_code)
                time.sleep(0.3)
        self.assertIn(429, statuses)
        self.assertIn(200, statuses)
        wait_page(self.driver, lambda d: "team" in text_of(d, "frag-keys"), 20,
                  "the rate-limited key in the keys table")
        wait_page(self.driver, lambda d: len(d.find_element("css selector", "#frag-chart polyline")
                                             .get_attribute("points").split()) >= 3, 20,
                  "several points in the charts")
        self.assertIn("429", text_of(self.driver, "frag-activity"))
        screenshot(self.driver, "operator-page")

    def test_polling_fallback(self) -> None:
        """When Server-Sent Events cannot be had (here: every live stream slot is taken), the
        script polls instead."""
        log_in(self.driver, self.gateway, ADMIN_KEY)
        wait_page(self.driver, lambda d: "Live (Server-Sent" in text_of(d, "live-status"), 20,
                  "live updates over SSE")
        cookie = self.driver.get_cookie("llamaproxy_admin")["value"]
        self.driver.get("about:blank")  # close the page's own stream
        streams = []
        try:
            for _ in range(MAX_STREAMS):
                sock = socket.create_connection(("127.0.0.1", self.gateway.admin_port))  # type: ignore[attr-defined]
                sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n"
                             + f"Cookie: llamaproxy_admin={cookie}\r\n\r\n".encode())
                streams.append(sock)
                self.assertIn(b"200 OK", sock.recv(4096))
            self.driver.get(admin_url(self.gateway))
            wait_page(self.driver, lambda d: "Live (polling" in text_of(d, "live-status"), 20,
                      "live updates by polling")
            first = self.driver.find_element("tag name", "body").get_attribute("data-updated")
            wait_page(self.driver, lambda d: d.find_element("tag name", "body")
                      .get_attribute("data-updated") != first, 10, "a further polled update")
        finally:
            for sock in streams:
                sock.close()

    def test_restart_asks_for_confirmation_and_restarts(self) -> None:
        from selenium.webdriver.common.by import By

        log_in(self.driver, self.gateway, ADMIN_KEY)
        wait_page(self.driver, lambda d: "Live" in text_of(d, "live-status"), 20, "live")
        first = self.gateway.child_pid()
        self.driver.find_element(By.CSS_SELECTOR, "button.restart").click()
        alert = self.driver.switch_to.alert
        self.assertIn("Restart llama-server of backend", alert.text)
        alert.dismiss()  # "Cancel": nothing happens
        time.sleep(1)
        self.assertEqual(self.gateway.child_pid(), first)
        self.driver.find_element(By.CSS_SELECTOR, "button.restart").click()
        self.driver.switch_to.alert.accept()
        wait_page(self.driver, lambda d: "is restarting" in d.page_source, 20,
                  "the restart notice")

        def new_child() -> bool:
            try:
                return self.gateway.child_pid() != first
            except AssertionError:
                return False  # between the old child and the new one

        wait_for(new_child, 60, "a new llama-server child")
        self.gateway.wait_ready(timeout=60)
        wait_page(self.driver, lambda d: "ready" in text_of(d, "frag-backends"), 30,
                  "the backend to show ready again")
        self.assertIn("at an operator's request", self.gateway.log_text())
        self.assertEqual(self.gateway.health()["backend"]["restarts"], 0)  # type: ignore[index]

    def test_page_without_javascript(self) -> None:
        from selenium.webdriver.common.by import By

        driver = chromium(javascript=False)
        self.addCleanup(driver.quit)
        log_in(driver, self.gateway, ADMIN_KEY)
        wait_page(driver, lambda d: "Static snapshot at" in text_of(d, "live-status"), 20,
                  "the static snapshot")
        time.sleep(1.5)  # no script: the status line never turns live
        self.assertIn("Static snapshot at", text_of(driver, "live-status"))
        for section in ("backends", "chart", "activity", "keys", "logs"):
            self.assertTrue(driver.find_element(By.ID, f"frag-{section}").text)
        self.assertTrue(driver.find_elements(By.CSS_SELECTOR, "#frag-chart svg"))
        screenshot(driver, "operator-page-no-javascript")
        # The restart button still asks first: the server renders a confirmation page.
        first = self.gateway.child_pid()
        driver.find_element(By.CSS_SELECTOR, "button.restart").click()
        wait_page(driver, lambda d: "Yes, restart" in d.page_source, 10, "the confirmation")
        driver.find_element(By.LINK_TEXT, "Cancel").click()
        wait_page(driver, lambda d: "Static snapshot at" in text_of(d, "live-status"), 10,
                  "the page again")
        self.assertEqual(self.gateway.child_pid(), first)
        # The activity filter is a plain form.
        driver.get(admin_url(self.gateway, "/?key=nobody"))
        self.assertIn("No requests yet.", driver.find_element(By.ID, "frag-activity").text)


class OperatorPageSessionTests(SynchronousTestCase):
    """Sessions and CSRF over plain HTTP."""

    skip = SLOW_GROUP

    def setUp(self) -> None:
        self.gateway = page_gateway()

    def login(self, client: httpx.Client) -> str:
        form = client.get(admin_url(self.gateway))
        token = form.text.split('name="login" value="', 1)[1].split('"', 1)[0]
        response = client.post(admin_url(self.gateway, "/login"),
                               data={"login": token, "api_key": ADMIN_KEY})
        self.assertEqual(response.status_code, 303)
        page = client.get(admin_url(self.gateway))
        return page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]

    def test_csrf_required_and_key_removal_ends_the_session(self) -> None:
        with httpx.Client() as client:
            csrf = self.login(client)
            refused = client.post(admin_url(self.gateway, "/restart"),
                                  data={"backend": "x", "confirm": "yes", "csrf": "wrong"})
            self.assertEqual(refused.status_code, 403)
            self.assertTrue(csrf)
            self.assertEqual(client.get(admin_url(self.gateway, "/state.json")).status_code, 200)
            state = client.get(admin_url(self.gateway, "/state.json")).text
            self.assertNotIn(API_KEY, state)
            self.assertNotIn(ADMIN_KEY, state)
            reloads = self.gateway.log_text().count("Loaded 3 API keys")
            self.gateway.keys_file.write_text(f"tester:{API_KEY}\n")
            try:
                wait_for(lambda: client.get(admin_url(self.gateway, "/state.json")).status_code
                         == 401, 20, "the session to end with its key")
                self.assertIn("Admin API key", client.get(admin_url(self.gateway)).text)
            finally:
                self.gateway.keys_file.write_text(KEYS)
        # (Polling the login would count as failed logins and lock the address out.)
        wait_for(lambda: self.gateway.log_text().count("Loaded 3 API keys") > reloads, 20,
                 "the admin key to be back")
        self.assertTrue(self.can_log_in())

    def can_log_in(self) -> bool:
        with httpx.Client() as client:
            form = client.get(admin_url(self.gateway))
            token = form.text.split('name="login" value="', 1)[1].split('"', 1)[0]
            response = client.post(admin_url(self.gateway, "/login"),
                                   data={"login": token, "api_key": ADMIN_KEY})
            return response.status_code == 303
