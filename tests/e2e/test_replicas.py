"""Three real `twistd llamaproxy` replicas sharing one redis-server and one llama-server.

- Shared slots: llama-server runs with ``--parallel 2``; each replica would send it 2 at once
  (MAX_CONCURRENT_REQUESTS=2), so without shared leases it would get up to 6 and defer 4. With
  STATE_URL it never has a request waiting inside it (``llamacpp:requests_deferred`` stays 0)
  and never more than 2 processing, while all requests succeed.
- Shared usage: ``llamaproxy usage --state-url`` counts every replica's requests.
- Shared limits: a burst spread over the three replicas admits the key's limit once.
- Redis restarted under load (STATE_FAILURE=open): no admitted request fails, and the replicas
  share again once Redis is back.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.harness import (
    API_KEY,
    Gateway,
    _die_with_parent,
    free_port,
    llama_server_binary,
    tiny_model,
    wait_for,
)
from tests.redis_server import RedisServer


class LlamaServer:
    """One llama-server of our own (not supervised by a gateway), for several gateways."""

    def __init__(self, parallel: int) -> None:
        self.port = free_port()
        self.log = tempfile.TemporaryFile(prefix="llama-server-")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [llama_server_binary(), "-m", tiny_model(), "--host", "127.0.0.1",
             "--port", str(self.port), "--parallel", str(parallel), "-c", "4096", "-ngl", "0",
             "-t", "1", "--metrics", "--alias", "tiny"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )

        def healthy() -> bool:
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 120, "llama-server to load the model")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def load(self) -> tuple[int, int]:
        """(requests processing, requests deferred) from its /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=2).text
        numbers = {}
        for name in ("requests_processing", "requests_deferred"):
            match = re.search(rf"^llamacpp:{name} (\S+)$", text, re.M)
            numbers[name] = int(float(match[1])) if match else 0
        return numbers["requests_processing"], numbers["requests_deferred"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


class Watcher(threading.Thread):
    """Polls llama-server's load until stopped; keeps the highest numbers seen."""

    def __init__(self, backend: LlamaServer) -> None:
        super().__init__(daemon=True)
        self.backend = backend
        self.most_processing = 0
        self.most_deferred = 0
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                processing, deferred = self.backend.load()
            except httpx.HTTPError:
                continue
            self.samples += 1
            self.most_processing = max(self.most_processing, processing)
            self.most_deferred = max(self.most_deferred, deferred)
            time.sleep(0.005)


def chat(gateway: Gateway, i: int) -> int:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": "tiny", "messages": [{"role": "user", "content": f"count {i}"}],
              "max_tokens": 128, "ignore_eos": True, "stream": True},
        timeout=120,
    )
    return response.status_code


class ReplicasTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)

    def replicas(self, backend_url: str, **env: str) -> list[Gateway]:
        gateways = []
        for _ in range(3):
            gateway = Gateway(env={
                "BACKEND_URL": backend_url, "STATE_URL": self.redis.url,
                "MAX_CONCURRENT_REQUESTS": "2", "MAX_REQUESTS_PER_MINUTE": "100000",
                "QUEUE_TIMEOUT": "120", **env,
            })
            gateways.append(gateway)
            gateway.start(wait_ready=False)
            self.addCleanup(gateway.stop)
        for gateway in gateways:
            gateway.wait_ready()
        return gateways

    def burst(
        self, gateways: list[Gateway], backend: LlamaServer, n: int
    ) -> tuple[Watcher, list[int]]:
        watcher = Watcher(backend)
        watcher.start()
        try:
            with ThreadPoolExecutor(n) as pool:
                statuses = list(pool.map(lambda i: chat(gateways[i % 3], i), range(n)))
        finally:
            watcher.done.set()
            watcher.join()
        return watcher, statuses

    def test_three_replicas_never_overfill_one_backend(self) -> None:
        backend = LlamaServer(parallel=2)
        self.addCleanup(backend.stop)
        gateways = self.replicas(backend.url)
        watcher, statuses = self.burst(gateways, backend, 18)
        self.assertEqual(statuses, [200] * 18)
        self.assertGreater(watcher.samples, 5)
        self.assertEqual(watcher.most_deferred, 0)  # nothing ever waited inside llama-server
        self.assertLessEqual(watcher.most_processing, 2)
        self.assertEqual(watcher.most_processing, 2)  # and both slots were used
        health = gateways[0].health()
        store = health["state_store"]
        assert isinstance(store, dict)
        self.assertEqual(store["status"], "up")

        def leased() -> str:
            text = httpx.get(f"{gateways[0].url}/metrics", headers={"Accept": "text/plain"},
                             timeout=10).text
            match = re.search(r"^llamaproxy_backend_slots_leased\{backend=\S+\} (\S+)$", text, re.M)
            return match[1] if match else "missing"

        wait_for(lambda: leased() == "0.0", 10, "the idle replica to give its leases back", 0.2)
        # Every replica's requests in one count (flushed within a second).
        def counted() -> bool:
            out = subprocess.run(
                [sys.executable, "-m", "llamaproxy", "usage", "--state-url", self.redis.url,
                 "--json"], capture_output=True, timeout=60, check=True,
            )
            return bool(json.loads(out.stdout)["total"]["requests"] == 18)

        wait_for(counted, 10, "the shared usage counters to count all 18 requests", 0.5)

    def test_without_shared_slots_the_backend_is_overfilled(self) -> None:
        # The control: the same three replicas without STATE_URL defer requests in llama-server.
        backend = LlamaServer(parallel=2)
        self.addCleanup(backend.stop)
        gateways = self.replicas(backend.url, STATE_URL="")
        watcher, statuses = self.burst(gateways, backend, 18)
        self.assertEqual(statuses, [200] * 18)
        self.assertGreater(watcher.most_deferred, 0)

    def test_a_burst_over_three_replicas_admits_the_limit_once(self) -> None:
        backend = LlamaServer(parallel=2)
        self.addCleanup(backend.stop)
        gateways = self.replicas(backend.url, MAX_REQUESTS_PER_MINUTE="5")

        def models(i: int) -> int:
            return httpx.get(
                f"{gateways[i % 3].url}/v1/models",
                headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30,
            ).status_code

        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(models, range(12)))
        self.assertEqual(sorted(statuses), [200] * 5 + [429] * 7)

    def test_redis_restarted_under_load_loses_nothing_acknowledged(self) -> None:
        # Redis as in production: an append-only file, so what it acknowledged survives it.
        self.redis.stop()
        self.redis = RedisServer(persistent=True).start()
        self.addCleanup(self.redis.cleanup)
        backend = LlamaServer(parallel=2)
        self.addCleanup(backend.stop)
        gateways = self.replicas(backend.url, STATE_FAILURE="open")
        with ThreadPoolExecutor(6) as pool:
            running = [pool.submit(chat, gateways[i % 3], i) for i in range(24)]
            time.sleep(0.3)
            self.redis.stop()
            time.sleep(1.0)
            self.redis.start()
            results = [f.result() for f in running]
        self.assertEqual(results, [200] * 24)  # every admitted request was answered

        def shared_again() -> bool:
            stores = [g.health()["state_store"] for g in gateways]
            return all(isinstance(s, dict) and s["status"] == "up" for s in stores)

        wait_for(shared_again, 20, "every replica to use Redis again", 0.2)

        # Usage: what Redis had acknowledged survived the restart, and what the replicas
        # counted while it was away arrived once it was back: every request, exactly once.
        def total() -> int:
            out = subprocess.run(
                [sys.executable, "-m", "llamaproxy", "usage", "--state-url", self.redis.url,
                 "--json"], capture_output=True, timeout=60, check=True,
            )
            return int(json.loads(out.stdout)["total"]["requests"])

        wait_for(lambda: total() == 24, 20, "the usage of all 24 requests in Redis", 0.5)
        time.sleep(1.5)  # a flush more: nothing counted twice
        self.assertEqual(total(), 24)

    def test_closed_mode_refuses_while_redis_is_away_and_health_says_so(self) -> None:
        gateway = Gateway(env={"STATE_URL": self.redis.url, "STATE_FAILURE": "closed"})
        gateway.start()
        self.addCleanup(gateway.stop)
        headers = {"Authorization": f"Bearer {API_KEY}"}

        def models() -> httpx.Response:
            return httpx.get(f"{gateway.url}/v1/models", headers=headers, timeout=30)

        def metric(name: str) -> float:
            text = httpx.get(f"{gateway.url}/metrics", headers={"Accept": "text/plain"},
                             timeout=10).text
            match = re.search(rf"^{name} (\S+)$", text, re.M)
            assert match is not None, f"{name} missing from /metrics"
            return float(match[1])

        self.assertEqual(models().status_code, 200)
        self.assertEqual(metric("llamaproxy_state_store_up"), 1.0)
        self.redis.stop()
        # A POST with a body, on a raw socket: answered before its body is read, then closed.
        body = b'{"model": "tiny", "messages": []}' + b" " * 200_000
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw:
            raw.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: Bearer {API_KEY}\r\n".encode()
                + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                .encode()
            )
            answer = b""
            while chunk := raw.recv(65536):
                answer += chunk
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer[:200])
        self.assertIn(b"state_unavailable", answer)
        refused = models()
        self.assertEqual(refused.status_code, 503)
        self.assertEqual(refused.headers["retry-after"], "1")
        self.assertEqual(refused.json()["error"]["code"], "state_unavailable")
        store = gateway.health()["state_store"]
        assert isinstance(store, dict)
        self.assertEqual((store["status"], store["failure_mode"]), ("down", "closed"))
        self.assertEqual(metric("llamaproxy_state_store_up"), 0.0)
        # Not ready either: a load balancer sends the requests to replicas that can serve them.
        self.assertEqual(httpx.get(f"{gateway.url}/readyz", timeout=10).status_code, 503)
        self.assertGreater(metric("llamaproxy_state_store_failures_total"), 0)
        self.redis.start()
        wait_for(lambda: models().status_code == 200, 20, "Redis to be used again", 0.2)
        self.assertEqual(httpx.get(f"{gateway.url}/readyz", timeout=10).status_code, 200)

    def test_keys_in_redis_reach_every_replica(self) -> None:
        backend = LlamaServer(parallel=2)
        self.addCleanup(backend.stop)
        gateways = self.replicas(backend.url, KEYS_STORE="redis")

        def keys(*args: str) -> str:
            return subprocess.run(
                [sys.executable, "-m", "llamaproxy", "keys", "--store", self.redis.url, *args],
                capture_output=True, text=True, timeout=60, check=True,
            ).stdout.strip()

        def statuses(key: str) -> list[int]:
            return [
                httpx.get(f"{g.url}/v1/models", headers={"Authorization": f"Bearer {key}"},
                          timeout=10).status_code
                for g in gateways
            ]

        self.assertEqual(statuses(API_KEY), [401] * 3)  # the key file is not used
        secret = keys("generate", "--name", "pod-user", "-q")
        wait_for(lambda: statuses(secret) == [200] * 3, 10, "every replica to know the key", 0.1)
        rotated = keys("rotate", "--name", "pod-user", "-q")
        wait_for(lambda: statuses(rotated) == [200] * 3, 10, "the rotated key everywhere", 0.1)
        self.assertEqual(statuses(secret), [401] * 3)
        keys("remove", "--name", "pod-user")
        wait_for(lambda: statuses(rotated) == [401] * 3, 10, "the key gone everywhere", 0.1)
