"""Admission end to end: fair queueing, queue limits, hang-ups, drain on SIGTERM, crash recovery."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading

import httpx
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.testing import ParsedResponse, parse_response
from tests.e2e.harness import API_KEY, Gateway, alive, wait_for

OTHER_KEY = "sk-e2e-other-key-0123456789abc"
KEYS = f"alice:{API_KEY}\nbob:{OTHER_KEY}\n"


class HeldStream:
    """A streaming completion whose client stops reading after the first bytes.

    Its tiny receive buffer makes backpressure hold the stream open in the gateway (and the
    backend slot busy) until ``finish()`` reads the rest.
    """

    def __init__(self, gateway: Gateway, key: str = API_KEY, max_tokens: int = 3500) -> None:
        body = json.dumps({"prompt": "Hello", "max_tokens": max_tokens, "temperature": 0,
                           "stream": True}).encode()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", gateway.port))
        self.sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        self.sock.settimeout(60)
        self.received = self.sock.recv(4096)

    def finish(self) -> ParsedResponse:
        """Read the rest; a connection the gateway aborted gives an incomplete response."""
        while not self.received.endswith(b"0\r\n\r\n"):
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            self.received += chunk
        self.sock.close()
        return parse_response(self.received)


def completion(gateway: Gateway, key: str, tag: str, results: dict[str, int]) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/completions", timeout=120,
        headers={"Authorization": f"Bearer {key}"},
        json={"prompt": tag, "max_tokens": 4, "temperature": 0},
    )
    results[tag] = response.status_code


def waiting(gateway: Gateway) -> int:
    return gateway.health()["queue"]["waiting"]  # type: ignore[index,no-any-return]


def launched_tasks(gateway: Gateway) -> int:
    """How many requests llama-server has started processing (from its log)."""
    return len(re.findall(r"launch_slot_", gateway.log_text()))


class QueueTests(SynchronousTestCase):
    def start(self, **env: str) -> Gateway:
        gateway = Gateway(env={"PARALLEL": "1", **env})
        gateway.keys_file.write_text(KEYS)
        gateway.start()
        self.addCleanup(gateway.stop)
        return gateway

    def test_round_robin_queue_full_and_hangup(self) -> None:
        gateway = self.start(MAX_QUEUE_SIZE="4")
        held = HeldStream(gateway)
        wait_for(lambda: gateway.health()["queue"]["active"] == 1, 10, "the held stream")  # type: ignore[index]
        results: dict[str, int] = {}
        threads = []
        # alice queues three, then a client that will hang up, then bob one: queue is now full.
        for queued, (tag, key) in enumerate(
            (("a1", API_KEY), ("a2", API_KEY), ("a3", API_KEY)), start=1
        ):
            threads.append(threading.Thread(target=completion, args=(gateway, key, tag, results)))
            threads[-1].start()
            wait_for(lambda n=queued: waiting(gateway) == n, 10, f"{tag} to queue")
        quitter = socket.create_connection(("127.0.0.1", gateway.port))
        body = json.dumps({"prompt": "quitter", "max_tokens": 4}).encode()
        quitter.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {OTHER_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_for(lambda: waiting(gateway) == 4, 10, "the quitter to queue")
        full = httpx.post(f"{gateway.url}/v1/completions", json={"prompt": "x", "max_tokens": 1},
                          headers={"Authorization": f"Bearer {OTHER_KEY}"})
        self.assertEqual(full.status_code, 503)
        self.assertEqual(full.json()["error"]["code"], "queue_full")
        self.assertEqual(full.headers["retry-after"], "5")
        quitter.close()
        wait_for(lambda: waiting(gateway) == 3, 10, "the quitter to leave the queue")
        threads.append(
            threading.Thread(target=completion, args=(gateway, OTHER_KEY, "b1", results))
        )
        threads[-1].start()
        wait_for(lambda: waiting(gateway) == 4, 10, "b1 to queue")
        before = launched_tasks(gateway)

        self.assertEqual(held.finish().status, 200)
        for thread in threads:
            thread.join(60)
        self.assertEqual(results, {"a1": 200, "a2": 200, "a3": 200, "b1": 200})
        def served_keys() -> list[str]:  # the access log, in completion order
            return [f[2] for f in gateway.access_log()
                    if f[3] == "POST /v1/completions" and f[4] == "200"]

        wait_for(lambda: len(served_keys()) == 5, 10, "five completions in the access log")
        served = served_keys()
        # The held stream, then a1 (first in line), then bob's single request, then alice's rest.
        self.assertEqual(served, ["alice", "alice", "bob", "alice", "alice"])
        wait_for(lambda: launched_tasks(gateway) == before + 4, 10, "llama-server's log")
        self.assertEqual(launched_tasks(gateway), before + 4, "the quitter reached the backend")


class DrainTests(SynchronousTestCase):
    def test_sigterm_lets_running_streams_finish(self) -> None:
        gateway = Gateway(env={"PARALLEL": "3"})
        gateway.keys_file.write_text(KEYS)
        gateway.start()
        self.addCleanup(gateway.stop)
        child = gateway.child_pid()
        held = [HeldStream(gateway) for _ in range(3)]
        wait_for(lambda: gateway.health()["queue"]["active"] == 3, 10, "three streams")  # type: ignore[index]
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{gateway.health_port}/readyz").status_code
                 == 503, 10, "readiness to go 503")
        with self.assertRaises(httpx.ConnectError):
            httpx.get(f"{gateway.url}/ping")  # the gateway listener is closed
        for stream in held:
            response = stream.finish()
            self.assertEqual(response.status, 200)
            self.assertTrue(response.complete)
            self.assertTrue(response.body.rstrip().endswith(b"data: [DONE]"))
        self.assertEqual(gateway.process.wait(60), 0)
        self.assertFalse(alive(child))


    def test_a_drain_that_cuts_a_stream_exits_by_the_signal(self) -> None:
        # The exit status tells an orchestrator whether anything was lost: 0 above, death by
        # SIGTERM (143 in a shell) when DRAIN_TIMEOUT cut a stream its client was not reading.
        gateway = Gateway(env={"PARALLEL": "1", "DRAIN_TIMEOUT": "1"})
        gateway.keys_file.write_text(KEYS)
        gateway.start()
        self.addCleanup(gateway.stop)
        held = HeldStream(gateway)
        wait_for(lambda: gateway.health()["queue"]["active"] == 1, 10, "the held stream")  # type: ignore[index]
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGTERM)
        self.assertEqual(gateway.process.wait(60), -signal.SIGTERM)
        self.assertFalse(held.finish().complete)
        self.assertIn("Stopped after cutting requests still in flight", gateway.output())


class CrashTests(SynchronousTestCase):
    def test_queued_requests_survive_a_backend_crash(self) -> None:
        gateway = Gateway(env={"PARALLEL": "1", "BACKOFF_MAX": "2"})
        gateway.keys_file.write_text(KEYS)
        gateway.start()
        self.addCleanup(gateway.stop)
        held = HeldStream(gateway)
        wait_for(lambda: gateway.health()["queue"]["active"] == 1, 10, "the held stream")  # type: ignore[index]
        results: dict[str, int] = {}
        threads = [threading.Thread(target=completion, args=(gateway, key, tag, results))
                   for tag, key in (("q1", API_KEY), ("q2", OTHER_KEY))]
        for n, thread in enumerate(threads, start=1):
            thread.start()
            wait_for(lambda n=n: waiting(gateway) == n, 10, "requests to queue")
        os.kill(gateway.child_pid(), signal.SIGKILL)
        broken = held.finish()
        self.assertFalse(broken.complete)  # the interrupted stream is cut, not ended cleanly
        for thread in threads:
            thread.join(60)
        self.assertEqual(results, {"q1": 200, "q2": 200})
        self.assertEqual(gateway.health()["backend"]["restarts"], 1)  # type: ignore[index]
