"""The runnable gateway end to end: real twistd, real llama-server, the official openai client."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import httpx
import openai
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.harness import API_KEY, Gateway, alive, shared_gateway, wait_for

PROMPT = [{"role": "user", "content": "Say hello"}]


class ServingTests(SynchronousTestCase):
    """One shared gateway for the read-only checks: models, chat, streaming, completions, errors."""

    gateway: Gateway

    def setUp(self) -> None:
        self.gateway = shared_gateway()

    def client(self, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.gateway.url}/v1", api_key=API_KEY, max_retries=0, timeout=60,
            **kwargs,  # type: ignore[arg-type]
        )

    def test_models(self) -> None:
        models = self.client().models.list()
        self.assertEqual([m.id for m in models.data], ["tiny"])
        self.assertEqual(self.client().models.retrieve("tiny").id, "tiny")

    def test_chat_stream_matches_non_stream(self) -> None:
        client = self.client()
        whole = client.chat.completions.create(
            model="tiny", messages=PROMPT, max_tokens=24, temperature=0  # type: ignore[arg-type]
        )
        text = whole.choices[0].message.content
        self.assertTrue(text)
        self.assertEqual(whole.choices[0].finish_reason, "length")
        stream = client.chat.completions.create(
            model="tiny", messages=PROMPT, max_tokens=24, temperature=0, stream=True,  # type: ignore[arg-type]
        )
        parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
        self.assertEqual("".join(parts), text)
        self.assertGreater(len([p for p in parts if p]), 5)

    def test_stream_usage_only_when_asked(self) -> None:
        """The gateway asks llama-server for usage but clients see only what they asked for."""
        client = self.client()
        plain = list(client.chat.completions.create(
            model="tiny", messages=PROMPT, max_tokens=8, temperature=0, stream=True,  # type: ignore[arg-type]
        ))
        self.assertEqual([c for c in plain if c.usage is not None or not c.choices], [])
        asked = list(client.chat.completions.create(
            model="tiny", messages=PROMPT, max_tokens=8, temperature=0, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        ))
        with_usage = [c for c in asked if c.usage is not None]
        self.assertEqual(len(with_usage), 1)
        self.assertEqual(with_usage[0].choices, [])
        self.assertEqual(with_usage[0].usage.completion_tokens, 8)  # type: ignore[union-attr]

    def test_stream_arrives_in_separate_reads(self) -> None:
        """SSE events are relayed as the backend emits them, not buffered into one block."""
        body = {"model": "tiny", "messages": PROMPT, "max_tokens": 64, "temperature": 0,
                "stream": True}
        reads = []
        with httpx.stream(
            "POST", f"{self.gateway.url}/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
        ) as response:
            self.assertEqual(response.status_code, 200)
            self.assertTrue(response.headers["content-type"].startswith("text/event-stream"))
            self.assertEqual(response.headers.get("x-accel-buffering"), "no")
            for chunk in response.iter_raw():
                reads.append(chunk)
        joined = b"".join(reads)
        self.assertTrue(joined.rstrip().endswith(b"data: [DONE]"))
        self.assertGreater(len(reads), 3, "the stream came in one block")

    def test_completions(self) -> None:
        result = self.client().completions.create(
            model="tiny", prompt="Hello", max_tokens=16, temperature=0
        )
        self.assertTrue(result.choices[0].text)
        self.assertEqual(result.usage.completion_tokens, 16)  # type: ignore[union-attr]

    def test_wrong_key_is_401(self) -> None:
        client = openai.OpenAI(
            base_url=f"{self.gateway.url}/v1", api_key="sk-wrong-key-000000000000", max_retries=0
        )
        with self.assertRaises(openai.AuthenticationError) as raised:
            client.models.list()
        self.assertEqual(raised.exception.body["message"], "Invalid API key")  # type: ignore[index]

    def test_public_routes_and_404(self) -> None:
        url = self.gateway.url
        self.assertEqual(httpx.get(f"{url}/ping").status_code, 200)
        health = self.gateway.health()
        self.assertEqual(health["status"], "ok")
        self.assertEqual(health["backend"]["state"], "ready")  # type: ignore[index]
        self.assertEqual(health["model"], "tiny")
        self.assertNotIn("tester", json.dumps(health))
        self.assertEqual(httpx.get(f"{url}/readyz").status_code, 200)
        health_url = f"http://127.0.0.1:{self.gateway.health_port}/any"
        self.assertEqual(httpx.get(health_url).status_code, 200)
        for path in ("/slots", "/props", "/metrics/../slots", "/v1/../slots"):
            response = httpx.get(url + path, headers={"Authorization": f"Bearer {API_KEY}"})
            self.assertEqual(response.status_code, 404, path)
            self.assertEqual(response.json()["error"]["code"], "not_found")

    def test_backend_cors_headers_are_dropped(self) -> None:
        response = httpx.get(
            f"{self.gateway.url}/v1/models",
            headers={"Authorization": f"Bearer {API_KEY}", "Origin": "https://evil.example"},
        )
        self.assertEqual(response.status_code, 200)
        self.assertFalse([h for h in response.headers if h.lower().startswith("access-control-")])

    def test_client_hangup_stops_generation(self) -> None:
        """A client that leaves mid-stream makes llama-server cancel the task and free the slot."""
        body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 3500,
                           "temperature": 0, "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", self.gateway.port))
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while received.count(b"data: ") < 3:
            received += sock.recv(4096)
        sock.close()
        key = self.gateway.backend_key()

        def slot_idle() -> bool:
            slots = httpx.get(
                f"{self.gateway.backend_url}/slots", headers={"Authorization": f"Bearer {key}"}
            ).json()
            return not any(s["is_processing"] for s in slots)

        wait_for(slot_idle, 30, "the backend slot to become idle")
        wait_for(lambda: "cancel task" in self.gateway.log_text(), 10, "llama-server to cancel")
        stopped = re.findall(r"stop processing: n_tokens = (\d+)", self.gateway.log_text())
        self.assertTrue(stopped)
        self.assertLess(int(stopped[-1]), 3500, "the backend generated everything anyway")


class SupervisionTests(SynchronousTestCase):
    """Crash recovery and clean shutdown, each on its own gateway."""

    def test_kill_9_gives_503_then_recovers(self) -> None:
        # QUEUE_TIMEOUT shorter than the restart (1 s backoff + jitter): requests that waited in
        # vain get 503 with Retry-After; with the default they would wait and succeed.
        gateway = Gateway(env={"BACKOFF_MAX": "3", "QUEUE_TIMEOUT": "0.3"}).start()
        self.addCleanup(gateway.stop)
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0)
        self.assertEqual(client.models.list().data[0].id, "tiny")
        first = gateway.child_pid()
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: gateway.health()["backend"]["state"] != "ready", 10,  # type: ignore[index]
                 "the gateway to notice the crash")
        response = httpx.get(f"{gateway.url}/v1/models",
                             headers={"Authorization": f"Bearer {API_KEY}"})
        self.assertEqual(response.status_code, 503)
        self.assertGreaterEqual(int(response.headers["retry-after"]), 1)
        self.assertEqual(response.json()["error"]["code"], "backend_unavailable")
        self.assertEqual(httpx.get(f"{gateway.url}/readyz").status_code, 503)
        gateway.wait_ready(timeout=60)
        self.assertEqual(client.models.list().data[0].id, "tiny")
        health = gateway.health()
        self.assertEqual(health["backend"]["restarts"], 1)  # type: ignore[index]
        self.assertIn("SIGKILL", health["backend"]["last_exit"] or "")  # type: ignore[index]
        self.assertNotEqual(gateway.child_pid(), first)

    def test_sigterm_leaves_no_llama_server_behind(self) -> None:
        gateway = Gateway().start()
        self.addCleanup(gateway.stop)
        child = gateway.child_pid()
        [key_file] = gateway.key_files()
        self.assertTrue(key_file.exists())
        self.assertEqual(key_file.stat().st_mode & 0o777, 0o600)
        started = time.monotonic()
        self.assertEqual(gateway.terminate(), 0)
        self.assertFalse(alive(child), "llama-server outlived twistd")
        self.assertFalse(key_file.exists(), "the backend key file was left behind")
        self.assertLess(time.monotonic() - started, 60)


    def test_kill_9_of_twistd_takes_llama_server_along(self) -> None:
        """Even when twistd cannot clean up, the kernel stops the child (PR_SET_PDEATHSIG)."""
        gateway = Gateway().start()
        self.addCleanup(gateway.stop)
        child = gateway.child_pid()
        assert gateway.process is not None
        gateway.process.kill()
        gateway.process.wait(10)
        # llama-server exits on that SIGTERM, here at once even with both cores busy; in one full
        # CI run it was still alive 10 s later (not reproduced since). More time, and if it
        # happens again, the child's state in the message.
        try:
            wait_for(lambda: not alive(child), 30, "llama-server to exit after twistd was killed")
        except AssertionError as e:
            raise AssertionError(f"{e}; its state: {_proc_state(child)}") from None


class EmbeddingsTests(SynchronousTestCase):
    """Embeddings through a gateway whose child runs with --embeddings --pooling mean."""

    def test_embeddings(self) -> None:
        gateway = Gateway(env={"EXTRA_ARGS": "--embeddings --pooling mean"}).start()
        self.addCleanup(gateway.stop)
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0)
        result = client.embeddings.create(model="tiny", input=["hello", "world"])
        self.assertEqual(len(result.data), 2)
        self.assertEqual(len(result.data[0].embedding), 64)


def _proc_state(pid: int) -> str:
    """A process's state line and wait channel from /proc (for a failure message)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError as e:
        return f"unreadable ({e})"
    state = [line for line in status if line.startswith(("State:", "PPid:", "SigPnd:", "ShdPnd:"))]
    return f"{'; '.join(state)}; wchan {wchan}"
