"""llama-server's per-request lines stay out of the default log (issue 16.12), on the real child."""

from __future__ import annotations

import time

import httpx
from twisted.trial.unittest import TestCase

from tests.e2e.harness import API_KEY, Gateway

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def child_lines(gw: Gateway) -> list[str]:
    marker = "[llamaproxy.supervision.llama_server#"
    return [line for line in gw.log_text().splitlines() if marker in line]


class ChildLogTests(TestCase):
    def run_one(self, env: dict[str, str]) -> list[str]:
        gw = Gateway(env=env)
        if not env:
            del gw.env["CHILD_REQUEST_LOG_LEVEL"]  # the harness's; the default is what we test
        self.addCleanup(gw.stop)
        gw.start()
        response = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, timeout=60,
                              headers={"Authorization": f"Bearer {API_KEY}"})
        self.assertEqual(response.status_code, 200)
        time.sleep(0.5)  # the child's lines after the answer
        return child_lines(gw)

    def test_request_lines_hidden_by_default_startup_lines_kept(self) -> None:
        lines = self.run_one({})
        self.assertTrue(any("listening on" in line for line in lines), lines)
        self.assertFalse([line for line in lines if " slot " in line])

    def test_request_lines_at_info_on_request(self) -> None:
        lines = self.run_one({"CHILD_REQUEST_LOG_LEVEL": "info"})
        self.assertTrue([line for line in lines if " slot " in line], lines)
