"""Models on demand end to end: two tiny GGUF models in one ``max_running = 1`` group.

The first request starts a model; requests alternating between the two swap them within the
fairness bound; an idle model is unloaded after ``idle_ttl``; a stream in progress finishes
before its model is swapped out; a bad model file gives ``model_load_failed``; a reload adds an
on-demand model without touching the running one.
"""

from __future__ import annotations

import io
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.cli import main
from tests.e2e.harness import API_KEY, Gateway, children_of, free_port, tiny_model, wait_for
from tests.e2e.test_admission import HeldStream

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def on_demand(name: str, path: str, port: int, idle_ttl: float = 0, group: str = "gpu0") -> str:
    return f"""
[[backends]]
name = "{name}"
model_path = "{path}"
models = ["{name}"]
port = {port}
ctx = 4096
ngl = 0
threads = 1
parallel = 1
start = "on_demand"
{f'group = "{group}"' if group else ""}
{f"idle_ttl = {idle_ttl}" if idle_ttl else ""}
"""


class ModelsOnDemandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gateway = Gateway(env={"MAX_REQUESTS_PER_MINUTE": "100000", "LOAD_TIMEOUT": "60",
                                    "ADMIN_KEY_IDS": "tester"})
        root = self.gateway.root
        self.second = root / "tiny-b.gguf"
        self.second.write_bytes(Path(tiny_model()).read_bytes())
        self.bad = root / "bad.gguf"
        self.bad.write_bytes(b"GGUF" + b"\0" * 64)  # a GGUF header and nothing valid after it
        self.ports = [free_port() for _ in range(4)]
        self.config = root / "backends.toml"
        self.gateway.env["LLAMAPROXY_CONFIG"] = str(self.config)
        del self.gateway.env["MODEL_PATH"]

    def table(self, with_c: bool = False) -> str:
        text = '[[groups]]\nname = "gpu0"\nmax_running = 1\nswap_batch = 2\nswap_wait = 1\n'
        text += "swap_grace = 60\n"
        text += on_demand("a", tiny_model(), self.ports[0])
        text += on_demand("b", str(self.second), self.ports[1], idle_ttl=3)
        text += on_demand("bad", str(self.bad), self.ports[2], group="")
        if with_c:
            text += on_demand("c", tiny_model(), self.ports[3], group="")
        return text

    def models(self) -> dict[str, str]:
        listed = httpx.get(f"{self.gateway.url}/v1/models", headers=HEADERS, timeout=10).json()
        return {m["id"]: m["state"] for m in listed["data"]}

    def complete(self, model: str) -> httpx.Response:
        return httpx.post(f"{self.gateway.url}/v1/completions", headers=HEADERS, timeout=90,
                          json={"model": model, "prompt": "Hello", "max_tokens": 2,
                                "temperature": 0})

    def children(self) -> int:
        assert self.gateway.process is not None
        return len(children_of(self.gateway.process.pid))

    def test_models_on_demand(self) -> None:
        self.config.write_text(self.table())
        gateway = self.gateway.start()
        self.addCleanup(gateway.stop)
        self.assertEqual(self.models(), {"a": "stopped", "b": "stopped", "bad": "stopped"})
        self.assertEqual(self.children(), 0)

        # The first request starts its model (cold start measured: start -> answer).
        started = time.monotonic()
        response = self.complete("a")
        cold = time.monotonic() - started
        self.assertEqual(response.status_code, 200, response.text)
        print(f"\ncold start of the tiny model (request -> answer): {cold:.2f} s")
        self.assertEqual(self.models()["a"], "ready")

        # Two clients asking a and b at once, 6 requests each: swaps come in batches.
        def client(model: str) -> list[float]:
            waits = []
            for _ in range(6):
                began = time.monotonic()
                self.assertEqual(self.complete(model).status_code, 200)
                waits.append(time.monotonic() - began)
            return waits

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(client, ["a", "b"]))
        swaps = _metric(gateway, "llamaproxy_model_swaps_total")
        worst = max(max(r) for r in results)
        print(f"alternating a/b, 2 clients x 6 requests: {swaps:.0f} swaps, worst wait "
              f"{worst:.1f} s")
        self.assertGreaterEqual(swaps, 1)
        self.assertLessEqual(swaps, 12 / 2 + 1)  # swap_batch = 2: no swap per request
        self.assertLess(worst, 60)
        health = {b["name"]: b for b in gateway.health()["backends"]}  # type: ignore[union-attr]
        running = [n for n, b in health.items()
                   if b["on_demand"]["state"] in ("ready", "loading")]  # type: ignore[index]
        self.assertLessEqual(len(running), 1)  # max_running = 1

        # A stream in progress on a finishes before a swaps out for b.
        self.assertEqual(self.complete("a").status_code, 200)
        held = HeldStream(gateway)

        def draining_with_stream() -> bool:
            backends = {b["name"]: b for b in gateway.health()["backends"]}  # type: ignore[union-attr]
            a = backends["a"]
            return a["on_demand"]["state"] == "stopping" and a["in_flight"] >= 1  # type: ignore[index, operator]

        with ThreadPoolExecutor(1) as pool:
            waiting_b = pool.submit(self.complete, "b")
            # swap_wait (1 s) later the swap is due: a drains, its stream still open.
            wait_for(draining_with_stream, 20, "a to drain for b with its stream open")
            finished = held.finish()
            self.assertTrue(finished.complete)
            self.assertEqual(waiting_b.result(60).status_code, 200)
        self.assertEqual(self.models()["a"], "stopped")

        # b's idle_ttl (3 s) unloads it.
        wait_for(lambda: self.models()["b"] == "stopped", 20, "b to be unloaded when idle")
        self.assertEqual(self.children(), 0)

        # An operator loads and unloads a model: `llamaproxy models load|list|unload`.
        def cli(*argv: str) -> str:
            out, err = io.StringIO(), io.StringIO()
            code = main(["models", *argv, "--url", gateway.url, "--key", API_KEY],
                        stdout=out, stderr=err)
            self.assertEqual(code, 0, err.getvalue())
            return out.getvalue()

        cli("load", "a")
        wait_for(lambda: self.models()["a"] == "ready", 30, "a loaded by the operator")
        self.assertRegex(cli("list"), r"\ba +ready +gpu0 ")
        self.assertEqual(cli("unload", "a"), "a: stopped\n")
        self.assertEqual(self.children(), 0)

        # A streaming request for a stopped model: ": loading" comments, then the model's events.
        with httpx.stream("POST", f"{gateway.url}/v1/completions", headers=HEADERS, timeout=60,
                          json={"model": "a", "prompt": "Hello", "max_tokens": 3,
                                "stream": True}) as streamed:
            self.assertEqual(streamed.headers["content-type"], "text/event-stream")
            lines = [line for line in streamed.iter_lines() if line]
        self.assertEqual(lines[0], ": loading a 0s")
        self.assertTrue(any(line.startswith("data: {") for line in lines), lines)
        self.assertEqual(lines[-1], "data: [DONE]")

        # A bad model file: 503 model_load_failed with the child's reason, not retried at once.
        failed = self.complete("bad")
        self.assertEqual(failed.status_code, 503, failed.text)
        error = failed.json()["error"]
        self.assertEqual(error["code"], "model_load_failed")
        self.assertIn("'bad'", error["message"])
        print(f"bad model file: {error['message']}")
        self.assertIsNotNone(failed.headers.get("retry-after"))
        self.assertEqual(self.models()["bad"], "failed")

        # A reload adds an on-demand model; the running one keeps its process.
        self.assertEqual(self.complete("a").status_code, 200)
        [pid_before] = children_of(gateway.process.pid)  # type: ignore[union-attr]
        self.config.write_text(self.table(with_c=True))
        gateway.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_for(lambda: "c" in self.models(), 20, "model c after the reload")
        self.assertEqual(self.models()["c"], "stopped")
        self.assertEqual(children_of(gateway.process.pid), [pid_before])  # type: ignore[union-attr]
        self.assertEqual(self.complete("c").status_code, 200)


def _metric(gateway: Gateway, name: str) -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10,
                     headers={**HEADERS, "Accept": "text/plain; version=0.0.4"}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))
