"""One key cannot hurt the others (issue 15), tried as an attacker with one valid key would, on
the real `twistd llamaproxy` and the real llama-server, over raw sockets where it was observed
that way: JSON bodies built to blow up memory or the parser, streams cut to dodge the token limit,
refused requests that used to spend quota, made-up model names, a key file pointing at a device
or a FIFO, and bodies bigger than a key's share of the queue.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.observability.usage import query
from tests.e2e.harness import API_KEY, Gateway, shared_gateway, wait_for
from tests.e2e.test_hostile import rss_kib

AUTH = {"Authorization": f"Bearer {API_KEY}"}
OTHER_KEY = "sk-e2e-other-key-0123456789abcdef"
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0}


def raw_post(port: int, body: bytes, key: str = API_KEY, path: str = "/v1/chat/completions",
             timeout: float = 60) -> tuple[int, bytes]:
    """POST ``body`` with a Content-Length on a raw socket; the status and the response body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode() + body
        )
        data = b""
        while True:
            try:
                piece = s.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


def error_of(body: bytes) -> dict[str, object]:
    return json.loads(body)["error"]  # type: ignore[no-any-return]


def ledger_rows(gateway: Gateway) -> list[tuple[str, str, int, int, int, int]]:
    """The usage ledger after the gateway stopped: (key, model, requests, prompt, completion,
    partial) per row."""
    gateway.terminate()
    return [(r.key_id, r.model, r.requests, r.prompt_tokens, r.completion_tokens, r.partial)
            for r in query(str(gateway.root / "usage.sqlite3"))]


class BodyTests(SynchronousTestCase):
    """Observations 15.1 and 15.3: memory amplification and deep nesting."""

    def setUp(self) -> None:
        self.gateway = shared_gateway()

    def test_millions_of_empty_objects_are_refused_without_parsing(self) -> None:
        """A 10 MB body of ~3.4 million ``{}`` raised the RSS by 255 MB per request, 2.66 GB
        with 12 queued. Now it is a 400 naming the limit, and four at once cost little memory."""
        body = (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "x": ['
                + b",".join([b"{}"] * 3_400_000) + b"]}")
        self.assertLess(len(body), 10 * 1024 * 1024)
        assert self.gateway.process is not None
        pid = self.gateway.process.pid
        before = rss_kib(pid)
        results: list[tuple[int, bytes]] = []
        peak = [before]
        threads = [threading.Thread(target=lambda: results.append(
            raw_post(self.gateway.port, body))) for _ in range(4)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak[0] = max(peak[0], rss_kib(pid))
            time.sleep(0.01)
        for status, answer in results:
            self.assertEqual(status, 400)
            error = error_of(answer)
            self.assertEqual(error["code"], "invalid_json")
            self.assertIn("more than 200000 items", str(error["message"]))
        grown_mib = (peak[0] - before) / 1024
        print(f"\n  RSS before {before / 1024:.0f} MiB, peak {peak[0] / 1024:.0f} MiB "
              f"(+{grown_mib:.0f}) while four 10 MB bodies of empty objects arrived")
        # Each body is held as bytes while it arrives (4 x 10 MB); nothing is built from them.
        self.assertLess(grown_mib, 120)
        self.assertEqual(httpx.post(f"{self.gateway.url}/v1/chat/completions", json=CHAT,
                                    headers=AUTH, timeout=60).status_code, 200)

    def test_deep_nesting_is_a_400_without_a_traceback(self) -> None:
        """``[`` x 10 000 was a 500 and a RecursionError logged at critical level."""
        body = b'{"messages":' + b"[" * 10_000 + b"]" * 10_000 + b"}"
        status, answer = raw_post(self.gateway.port, body)
        self.assertEqual(status, 400)
        error = error_of(answer)
        self.assertEqual(error["code"], "invalid_json")
        self.assertIn("deeper than 64 levels", str(error["message"]))
        log = self.gateway.log_text()
        self.assertNotIn("RecursionError", log)
        self.assertNotIn("Traceback", log)

    def test_bodies_within_the_limits_still_work(self) -> None:
        doc = {**CHAT, "x": [[[[{"a": [1, 2, 3]}]]]] * 1000}
        response = httpx.post(f"{self.gateway.url}/v1/chat/completions", json=doc, headers=AUTH,
                              timeout=60)
        self.assertEqual(response.status_code, 200, response.text)


class AccountingTests(SynchronousTestCase):
    """Observations 15.2, 15.4 and 15.5."""

    def start(self, **env: str) -> Gateway:
        gateway = Gateway(env=env)
        self.addCleanup(gateway.stop)
        return gateway

    def test_hanging_up_does_not_dodge_the_token_limit(self) -> None:
        """A key limited to 300 tokens a minute read 150 tokens of each of 10 streams and hung
        up: all 10 got 200 and the ledger did not change. Now each cut stream is charged for
        what it relayed, and the limit answers 429 within a few streams."""
        gateway = self.start(TOKENS_PER_MINUTE="300").start()
        statuses = []
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as s:
                body = json.dumps({**CHAT, "max_tokens": 2000, "stream": True}).encode()
                s.sendall(
                    f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
                    .encode() + body)
                received = b""
                while received.count(b"\n\n") < 150:
                    piece = s.recv(4096)
                    if not piece:
                        break
                    received += piece
                statuses.append(int(received.split(b" ", 2)[1]))
            if statuses[-1] == 429:
                break
        self.assertIn(429, statuses, statuses)
        self.assertLessEqual(len(statuses), 4, statuses)
        rows = ledger_rows(gateway)
        [(key, model, requests, prompt, completion, partial)] = rows
        self.assertEqual((key, model), ("tester", "tiny"))
        self.assertEqual(requests, partial)  # every one of them was cut: estimated
        self.assertEqual(requests, statuses.count(200))
        self.assertGreaterEqual(completion, 150 * requests)
        self.assertGreater(prompt, 0)
        entries = [e for e in gateway.access_log() if e[3] == "POST /v1/chat/completions"
                   and e[4] == "200"]
        self.assertTrue(all(e[9].startswith("tokens=~") for e in entries), entries)

    def test_streams_without_usage_are_counted(self) -> None:
        """5 streams that did not ask for usage made 0 ledger rows; now their counts come from
        llama-server's timings."""
        gateway = self.start().start()
        for _ in range(5):
            with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", headers=AUTH,
                              json={**CHAT, "stream": True}, timeout=60) as response:
                self.assertEqual(response.status_code, 200)
                response.read()
        [(key, model, requests, prompt, completion, partial)] = ledger_rows(gateway)
        self.assertEqual((key, model, requests, completion, partial), ("tester", "tiny", 5, 40, 0))
        self.assertGreater(prompt, 0)

    def test_refused_requests_cost_nothing(self) -> None:
        """A key limited to 3/min got 429 after three requests that were themselves refused."""
        gateway = self.start()
        gateway.keys_file.write_text(f"tester:{API_KEY}:3\n")
        gateway.start()
        url = f"{gateway.url}/v1/chat/completions"
        for bad in (b"{not json", b'{"messages": 1}', b'{"messages":' + b"[" * 100 + b"]" * 100
                    + b"}", b'{"no": "messages"}'):
            response = httpx.post(url, content=bad, headers=AUTH, timeout=30)
            self.assertEqual(response.status_code, 400, response.text)
            self.assertEqual(response.headers["x-ratelimit-remaining"], "3")
        for remaining in ("2", "1", "0"):
            response = httpx.post(url, json=CHAT, headers=AUTH, timeout=60)
            self.assertEqual(response.status_code, 200, response.text)
            self.assertEqual(response.headers["x-ratelimit-remaining"], remaining)
        self.assertEqual(httpx.post(url, json=CHAT, headers=AUTH, timeout=60).status_code, 429)

    def test_made_up_model_names_make_no_ledger_rows(self) -> None:
        """100 requests with 100 model names made 100 ledger rows; rows are per served model."""
        gateway = self.start().start()
        for i in range(20):
            response = httpx.post(f"{gateway.url}/v1/chat/completions", headers=AUTH,
                                  json={**CHAT, "max_tokens": 1, "model": f"made-up-{i}"},
                                  timeout=60)
            self.assertEqual(response.status_code, 200, response.text)
        [(key, model, requests, *_)] = ledger_rows(gateway)
        self.assertEqual((key, model, requests), ("tester", "tiny", 20))


class QueueBytesTests(SynchronousTestCase):
    def test_a_key_cannot_hold_more_than_its_share_of_body_bytes(self) -> None:
        gateway = Gateway(env={"MAX_QUEUE_BYTES_PER_KEY": str(1 << 20),
                               "MAX_QUEUE_BYTES": str(4 << 20)})
        gateway.keys_file.write_text(f"tester:{API_KEY}\nother:{OTHER_KEY}\n")
        gateway.start()
        self.addCleanup(gateway.stop)
        padding = "x" * (1536 * 1024)
        body = json.dumps({**CHAT, "messages": [{"role": "user", "content": padding}]}).encode()
        # Refused from its headers: the 1.5 MB body is never read.
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as s:
            s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                      f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
                      .encode())
            answer = s.recv(65536)
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)
        self.assertIn(b"Retry-After: 5", answer)
        self.assertIn(b'"queue_full"', answer)
        self.assertEqual(httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT,
                                    headers={"Authorization": f"Bearer {OTHER_KEY}"},
                                    timeout=60).status_code, 200)


class KeyFileTests(SynchronousTestCase):
    """Observation 15.6: the key file pointing at /dev/zero (OOM) or a FIFO (event loop stuck)."""

    def test_device_and_fifo_keep_the_old_keys_and_the_loop_running(self) -> None:
        gateway = Gateway()
        gateway.start()
        self.addCleanup(gateway.stop)
        assert gateway.process is not None
        keys = gateway.keys_file
        real = keys.with_suffix(".real")
        os.replace(keys, real)
        fifo = gateway.root / "keys.fifo"
        os.mkfifo(fifo)
        for target in (Path("/dev/zero"), fifo):
            with_link = keys.parent / "link.tmp"
            os.symlink(target, with_link)
            os.replace(with_link, keys)
            gateway.process.send_signal(signal.SIGHUP)
            wait_for(lambda t=target: f"{keys} is not a regular file" in gateway.log_text()
                     and gateway.log_text().count("not a regular file") >= (
                         1 if t == Path("/dev/zero") else 2), 20, f"the refusal of {target}")
            self.assertEqual(httpx.get(f"{gateway.url}/ping", timeout=5).status_code, 200)
            self.assertEqual(httpx.get(f"http://127.0.0.1:{gateway.health_port}/",
                                       timeout=5).status_code, 200)
            response = httpx.post(f"{gateway.url}/v1/chat/completions", json=CHAT, headers=AUTH,
                                  timeout=60)
            self.assertEqual(response.status_code, 200)  # the old key still works
        self.assertLess(rss_kib(gateway.process.pid), 200 * 1024)
