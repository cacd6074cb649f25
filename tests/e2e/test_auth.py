"""API keys end to end: real twistd + llama-server, the openai client, reloads, the keys CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.testing import parse_response
from tests.e2e.harness import API_KEY, Gateway, wait_for

SECOND_KEY = "sk-e2e-second-key-0123456789ab"


def models_status(gateway: Gateway, key: str) -> int:
    response = httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    return response.status_code


class AuthTests(SynchronousTestCase):
    def start(self, keys: str, **env: str) -> Gateway:
        gateway = Gateway(env={"KEYS_RELOAD_INTERVAL": "0.2", **env})
        gateway.keys_file.write_text(keys)
        gateway.start()
        self.addCleanup(gateway.stop)
        return gateway

    def client(self, gateway: Gateway, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)

    def test_fail_closed_then_a_key_appears(self) -> None:
        gateway = self.start("# no keys yet\n")
        with self.assertRaises(openai.AuthenticationError) as raised:
            self.client(gateway, API_KEY).models.list()
        self.assertEqual(raised.exception.body["message"],  # type: ignore[index]
                         "Authentication misconfigured: no API keys loaded")
        with gateway.keys_file.open("a") as f:
            f.write(f"tester:{API_KEY}\n")
        wait_for(lambda: models_status(gateway, API_KEY) == 200, 10, "the new key to work")

    def test_wrong_expired_and_missing_keys(self) -> None:
        gateway = self.start(f"tester:{API_KEY}\nold:{SECOND_KEY}::2020-01-01T00:00:00Z\n")
        for key, message in ((SECOND_KEY, "API key has expired"),
                             ("sk-not-configured-00000000", "Invalid API key")):
            with self.assertRaises(openai.AuthenticationError) as raised:
                self.client(gateway, key).models.list()
            self.assertEqual(raised.exception.body["message"], message)  # type: ignore[index]
        response = httpx.post(f"{gateway.url}/v1/chat/completions", json={"messages": []})
        self.assertEqual(response.status_code, 401)
        self.assertEqual(response.json()["error"]["message"], "Missing Authorization header")
        self.assertEqual(httpx.get(f"{gateway.url}/health").status_code, 200)  # public stays public

    def test_rate_limit_429_with_retry_after(self) -> None:
        gateway = self.start(f"tester:{API_KEY}:3\nother:{SECOND_KEY}\n")
        client = self.client(gateway, API_KEY)
        for _ in range(3):
            response = client.models.with_raw_response.list()
            self.assertEqual(response.headers["x-ratelimit-limit"], "3")
        self.assertEqual(response.headers["x-ratelimit-remaining"], "0")
        with self.assertRaises(openai.RateLimitError) as raised:
            client.models.list()
        retry_after = int(raised.exception.response.headers["retry-after"])
        self.assertTrue(1 <= retry_after <= 120, retry_after)
        self.assertEqual(raised.exception.body["code"], "rate_limit_exceeded")  # type: ignore[index]
        self.assertEqual(models_status(gateway, SECOND_KEY), 200)  # its own bucket

    def test_reload_during_a_stream(self) -> None:
        """Keys change (SIGHUP, file change) while another key's stream runs: it completes."""
        gateway = self.start(f"tester:{API_KEY}\n", ADMIN_KEY_IDS="tester")
        body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 3500,
                           "temperature": 0, "stream": True}).encode()
        # A client with a tiny receive buffer that stops reading: backpressure keeps the stream
        # in flight (paused in llama-server, not buffered in the gateway) while keys change.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gateway.port))
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = sock.recv(4096)
        # Remove the streaming key and add another, then SIGHUP.
        gateway.keys_file.write_text(f"other:{SECOND_KEY}\n")
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGHUP)
        wait_for(lambda: models_status(gateway, SECOND_KEY) == 200, 10, "the SIGHUP reload")
        self.assertEqual(models_status(gateway, API_KEY), 401)
        log = gateway.log_text()
        self.assertIn("(SIGHUP)", log)
        # The stream still holds its slot: it is in flight across the reload.
        self.assertEqual(gateway.health()["queue"]["active"], 1,  # type: ignore[index]
                         "the stream ended before the reload")
        sock.settimeout(60)
        while not received.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        sock.close()
        response = parse_response(received)
        self.assertEqual(response.status, 200)
        self.assertTrue(response.complete)
        events = [e for e in response.body.split(b"\n\n") if e]
        self.assertEqual(events[-1], b"data: [DONE]")
        self.assertEqual(json.loads(events[-2][6:])["choices"][0]["finish_reason"], "length")
        # An admin key may reload by request; others may not.
        gateway.keys_file.write_text(f"tester:{API_KEY}\nother:{SECOND_KEY}\n")
        response = httpx.post(f"{gateway.url}/reload",
                              headers={"Authorization": f"Bearer {SECOND_KEY}"})
        self.assertEqual(response.status_code, 403)

    def test_keys_cli_changes_reach_the_running_gateway(self) -> None:
        gateway = self.start(f"tester:{API_KEY}\n")
        cli = [str(Path(sys.executable).parent / "llamaproxy"), "keys", "--file",
               str(gateway.keys_file), "-q"]
        env = {k: v for k, v in os.environ.items() if k != "AUTH_KEYS_FILE"}
        new_key = subprocess.run([*cli, "generate", "--name", "cli-made"], env=env, check=True,
                                 capture_output=True, text=True).stdout.strip()
        wait_for(lambda: models_status(gateway, new_key) == 200, 10, "the generated key")
        subprocess.run([*cli, "remove", "--name", "cli-made"], env=env, check=True,
                       capture_output=True)
        wait_for(lambda: models_status(gateway, new_key) == 401, 10, "the removed key to fail")
        self.assertEqual(gateway.keys_file.stat().st_mode & 0o777, 0o600)
