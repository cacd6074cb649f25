"""Cold start of a model started on demand: request -> first token, through llamaproxy.

Starts the real `twistd llamaproxy` (tests/e2e harness) with a backends file declaring one
``start = "on_demand"`` model (the tiny generated one, or SmolLM2-135M with --model smollm2) and
``idle_ttl = 1``. Each round waits until the model is stopped (``/v1/models`` says so), then
times one streaming chat request: the first content token includes spawning llama-server,
loading the model and the first decode. A second request right after gives the warm figure.

    .venv/bin/python -m bench.cold_start [--model tiny|smollm2] [-n 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx

from bench.first_token import smollm2_path, stream_once
from tests.e2e.harness import API_KEY, Gateway, free_port, tiny_model, wait_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("-n", type=int, default=5, help="cold starts measured")
    args = parser.parse_args()
    path = tiny_model() if args.model == "tiny" else smollm2_path()
    gateway = Gateway(env={"MAX_REQUESTS_PER_MINUTE": "100000"})  # it polls /v1/models
    config = gateway.root / "backends.toml"
    config.write_text(f"""
[[backends]]
name = "m"
model_path = "{path}"
models = ["m"]
port = {free_port()}
ctx = 4096
ngl = 0
parallel = 1
start = "on_demand"
idle_ttl = 1
""")
    gateway.env["LLAMAPROXY_CONFIG"] = str(config)
    del gateway.env["MODEL_PATH"]
    gateway.env.pop("THREADS", None)
    gateway.start()
    cold: list[float] = []
    warm: list[float] = []
    try:
        with httpx.Client(timeout=300) as client:
            def state() -> str:
                doc = client.get(f"{gateway.url}/v1/models",
                                 headers={"Authorization": f"Bearer {API_KEY}"}).json()
                return str(doc["data"][0]["state"])

            for _ in range(args.n):
                wait_for(lambda: state() == "stopped", 60, "the model to be unloaded")
                cold.append(stream_once(client, gateway.url, API_KEY, 8)[0])
                warm.append(stream_once(client, gateway.url, API_KEY, 8)[0])
    finally:
        gateway.stop()
    print(f"{args.model}: cold start (request -> first token) median "
          f"{statistics.median(cold):.2f} s, max {max(cold):.2f} s; warm first token median "
          f"{statistics.median(warm) * 1000:.0f} ms ({args.n} rounds, "
          f"{time.strftime('%Y-%m-%d', time.gmtime())})")


if __name__ == "__main__":
    main()
