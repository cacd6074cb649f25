"""Metrics, logs and token accounting end to end, after a known sequence of requests.

Two successes, a stream, a 401, a 429, a 503 (queue full) and a backend error go through the real
gateway; then the Prometheus scrape, the JSON log, the access log and the usage ledger (read by
`llamaproxy usage`) must all tell the same story, and the ledger must survive a restart.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.harness import API_KEY, Gateway, wait_for
from tests.e2e.test_admission import HeldStream

LIMITED_KEY = "sk-e2e-limited-key-0123456789a"
PROMPT = [{"role": "user", "content": "Say hello"}]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    total = 0.0
    for (sample_name, sample_labels), v in found.items():
        if sample_name == name and all((k, lv) in sample_labels for k, lv in labels.items()):
            total += v
    return total


class ObservabilityTests(SynchronousTestCase):
    def test_a_known_sequence_is_seen_consistently(self) -> None:
        gateway = Gateway(env={"LOG_FORMAT": "json", "ACCESS_LOG_FORMAT": "json",
                               "PARALLEL": "1", "MAX_QUEUE_SIZE": "1", "WORKER_TYPE": "e2e"})
        gateway.keys_file.write_text(f"tester:{API_KEY}\nlimited:{LIMITED_KEY}:1\n")
        gateway.start()
        self.addCleanup(gateway.stop)
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0)
        tokens = {"prompt": 0, "completion": 0}
        for _ in range(2):
            result = client.chat.completions.create(
                model="tiny", messages=PROMPT, max_tokens=5, temperature=0  # type: ignore[arg-type]
            )
            assert result.usage is not None
            tokens["prompt"] += result.usage.prompt_tokens
            tokens["completion"] += result.usage.completion_tokens
        streamed = list(client.completions.create(
            model="tiny", prompt="Hello", max_tokens=7, temperature=0, stream=True,
            stream_options={"include_usage": True},
        ))
        usage = next(c.usage for c in streamed if c.usage is not None)
        tokens["prompt"] += usage.prompt_tokens
        tokens["completion"] += usage.completion_tokens
        # 401
        self.assertEqual(httpx.get(f"{gateway.url}/v1/models",
                                   headers={"Authorization": "Bearer sk-nope-00000000000000"}
                                   ).status_code, 401)
        # 429 (the limited key allows one request a minute)
        limited = {"Authorization": f"Bearer {LIMITED_KEY}"}
        self.assertEqual(httpx.get(f"{gateway.url}/v1/models", headers=limited).status_code, 200)
        self.assertEqual(httpx.get(f"{gateway.url}/v1/models", headers=limited).status_code, 429)
        # backend error: a prompt longer than the context
        too_long = client.completions.with_raw_response.create  # type: ignore[attr-defined]
        with self.assertRaises(openai.BadRequestError):
            too_long(model="tiny", prompt="hello " * 5000, max_tokens=1)
        # 503 queue full: one stream holds the only slot, one waits, the next is refused
        held = HeldStream(gateway)
        waiting = socket.create_connection(("127.0.0.1", gateway.port))
        body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
        waiting.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body)
        wait_for(lambda: gateway.health()["queue"]["waiting"] == 1, 10, "a waiting request")  # type: ignore[index]
        full = httpx.post(f"{gateway.url}/v1/completions", json={"prompt": "x", "max_tokens": 1},
                          headers={"Authorization": f"Bearer {API_KEY}"})
        self.assertEqual(full.status_code, 503)
        self.assertTrue(held.finish().complete)
        waiting.settimeout(30)
        self.assertTrue(waiting.recv(4096).startswith(b"HTTP/1.1 200"))
        waiting.close()
        wait_for(lambda: gateway.health()["queue"]["active"] == 0, 10, "the queue to empty")  # type: ignore[index]

        scrape = httpx.get(f"{gateway.url}/metrics", headers={"Accept": "text/plain"})
        self.assertTrue(scrape.headers["content-type"].startswith("text/plain"))
        found = samples(scrape.text)
        self.assertEqual(value(found, "llamaproxy_rejections_total", reason="auth"), 1)
        self.assertEqual(value(found, "llamaproxy_rejections_total", reason="rate_limit"), 1)
        self.assertEqual(value(found, "llamaproxy_rejections_total", reason="queue_full"), 1)
        self.assertGreaterEqual(value(found, "llamaproxy_requests_total", status="400"), 1)
        # The clients' own usage, plus the held stream (3500) and the queued request (1).
        self.assertEqual(value(found, "llamaproxy_tokens_total", kind="completion"),
                         tokens["completion"] + 3500 + 1)
        # llama-server's own metrics, re-exported with the model (as of the last fetch).
        self.assertTrue([k for k in found if k[0] == "llamacpp:prompt_tokens_total"
                         and ("model", "tiny") in k[1]])
        self.assertNotIn("key_id", scrape.text)  # per-key series are not public
        legacy = httpx.get(f"{gateway.url}/metrics").json()["gateway"]
        self.assertEqual(legacy["requests_unauthorized"], 1)
        self.assertEqual(legacy["queue_rejections"], 1)

        for line in gateway.log_text().splitlines():
            record = json.loads(line)
            self.assertIn("ts", record)
            self.assertIn(record["level"], ("debug", "info", "warn", "error", "critical"))
            self.assertEqual(record.get("worker_type"), "e2e")
        access = [json.loads(line) for line in
                  (gateway.root / "logs" / "api_access.log").read_text().splitlines()]
        statuses = [entry["status"] for entry in access]
        for status in (200, 401, 429, 503, 400):
            self.assertIn(status, statuses)
        self.assertTrue(all(entry["request_id"] for entry in access))


class LedgerTests(SynchronousTestCase):
    def usage(self, ledger: Path) -> dict[str, int]:
        result = subprocess.run(
            [str(Path(sys.executable).parent / "llamaproxy"), "usage", "--file", str(ledger),
             "--json"], capture_output=True, text=True, check=True)
        rows = json.loads(result.stdout)
        rows = rows["rows"] if isinstance(rows, dict) else rows
        totals = {"prompt": 0, "completion": 0, "requests": 0}
        for row in rows:
            totals["prompt"] += row["prompt_tokens"]
            totals["completion"] += row["completion_tokens"]
            totals["requests"] += row["requests"]
        return totals

    def test_ledger_matches_clients_and_survives_a_restart(self) -> None:
        gateway = Gateway()
        gateway.start()
        self.addCleanup(gateway.stop)
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0)
        seen = {"prompt": 0, "completion": 0}

        def run_some() -> None:
            whole = client.chat.completions.create(
                model="tiny", messages=PROMPT, max_tokens=6, temperature=0  # type: ignore[arg-type]
            )
            assert whole.usage is not None
            seen["prompt"] += whole.usage.prompt_tokens
            seen["completion"] += whole.usage.completion_tokens
            # A stream whose client did not ask for usage: still accounted.
            parts = list(client.chat.completions.create(
                model="tiny", messages=PROMPT, max_tokens=9, temperature=0, stream=True,  # type: ignore[arg-type]
            ))
            self.assertEqual([c for c in parts if c.usage is not None], [])
            seen["prompt"] += whole.usage.prompt_tokens  # same prompt, same prompt tokens
            seen["completion"] += 9

        run_some()
        self.assertEqual(gateway.terminate(), 0)  # stop flushes the ledger
        ledger = gateway.root / "usage.sqlite3"
        self.assertEqual(self.usage(ledger), {**seen, "requests": 2})
        gateway.start()
        run_some()
        self.assertEqual(gateway.terminate(), 0)
        self.assertEqual(self.usage(ledger), {**seen, "requests": 4})
