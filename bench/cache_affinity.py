"""Prompt-cache-aware routing on real llama-server: cache_affinity vs round-robin vs least-busy.

Starts the real `twistd llamaproxy` (tests/e2e harness) with a backends file of two local
llama-server children of the SmolLM2-135M demo model (``--parallel 2`` each, one thread each)
serving three model names, one per strategy: ``aff`` (cache_affinity), ``rr`` (round-robin) and
``lb`` (least-busy). Each block runs C concurrent multi-turn conversations of T turns through one
of the names; every conversation has its own long system prompt (fresh for every block, so no
block finds another's prompts in a cache), each turn sends the whole history and streams a
short answer, and the "user" reads it for a while (``--think``: uniform between 0.5 and 1.5
times that many seconds) before the next turn. Without think time a closed loop flatters
least-busy: a conversation's next turn arrives just as its own request left its replica, which
is then the least busy one, so least-busy keeps conversations in place by accident.

Blocks alternate between the strategies (aff, rr, lb, then rr, lb, aff, ...), so drifts in
machine load hit all three alike.

Reported per strategy: time to first content token (p50/p95) of turn 1 and of turns >= 2, and
prompt tokens evaluated vs reused from the cache (llama-server's ``timings.prompt_n`` and
``cache_n`` of each response).

    .venv/bin/python -m bench.cache_affinity [--conversations 8] [--turns 6] [--rounds 1]
        [--think 2] [--pin-slot]

``--pin-slot`` adds a fourth block: ``cache_affinity`` with ``pin_slot = true`` (model ``pin``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import cast

import httpx

from bench.first_token import smollm2_path
from tests.e2e.harness import API_KEY, Gateway, free_port, wait_for

STRATEGIES = {"aff": "cache_affinity", "rr": "round-robin", "lb": "least-busy"}
#: With --pin-slot: a fourth model, cache_affinity with pin_slot = true.
PINNED = {"pin": "cache_affinity"}

_TEXT = (
    "the proxy gateway routes each request to a backend server that keeps a cache of recent "
    "prompts so that a conversation which returns to the same replica can reuse the work done "
    "for its earlier turns instead of evaluating the whole history again on every request while "
    "operators watch latency throughput tokens queues slots health metrics logs and keys across "
    "several machines models replicas clusters regions customers tenants documents tools files "
    "tables rows columns indexes schemas invoices orders payments refunds tickets incidents"
)
WORDS = _TEXT.split(" ")


def system_prompt(rng: random.Random, words: int) -> str:
    """A distinct long system prompt (about 1.3 SmolLM2 tokens per word)."""
    return "You are the assistant of case " + str(rng.getrandbits(48)) + ". " + " ".join(
        rng.choice(WORDS) for _ in range(words)) + "."


@dataclass
class Turn:
    strategy: str
    turn: int
    ttft: float
    evaluated: int
    reused: int


@dataclass
class Block:
    strategy: str
    turns: list[Turn] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def converse(url: str, block: Block, model: str, system: str, turns: int, max_tokens: int,
             think: list[float], errors: list[str]) -> None:
    """One conversation: ``turns`` streamed requests, each with the whole history."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    with httpx.Client(timeout=600) as client:
        for index in range(turns):
            if index:
                time.sleep(think[index])
            messages.append({"role": "user", "content": f"Question {index + 1}: what should "
                             f"the operator check first about item {index * 7 + 3}?"})
            body = {"model": model, "messages": messages, "max_tokens": max_tokens,
                    "temperature": 0, "stream": True}
            started = time.perf_counter()
            first = None
            text = []
            timings: dict[str, int] = {}
            with client.stream("POST", url + "/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {API_KEY}"}) as response:
                if response.status_code != 200:
                    errors.append(f"{model} turn {index + 1}: {response.status_code}")
                    return
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    doc = json.loads(line[6:])
                    if doc.get("choices"):
                        content = doc["choices"][0].get("delta", {}).get("content")
                        if content:
                            if first is None:
                                first = time.perf_counter() - started
                            text.append(content)
                    if "timings" in doc:
                        timings = doc["timings"]
            messages.append({"role": "assistant", "content": "".join(text)})
            with block.lock:
                block.turns.append(Turn(
                    block.strategy, index + 1,
                    first if first is not None else time.perf_counter() - started,
                    int(timings.get("prompt_n", 0)), int(timings.get("cache_n", 0))))


def backends_file(model_path: str, ports: list[int], threads: int,
                  strategies: dict[str, str]) -> str:
    text = "[affinity]\n\n"
    for name, strategy in strategies.items():
        text += f'[models.{name}]\nstrategy = "{strategy}"\n'
        text += "pin_slot = true\n\n" if name in PINNED else "\n"
    for index, port in enumerate(ports):
        text += f"""[[backends]]
name = "replica-{index}"
model_path = "{model_path}"
models = {json.dumps(list(strategies))}
port = {port}
ctx = 8192
ngl = 0
threads = {threads}
parallel = 2

"""
    return text


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=1, help="blocks per strategy")
    parser.add_argument("--words", type=int, default=1300, help="system prompt length, words")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="threads per llama-server")
    parser.add_argument("--think", type=float, default=2.0,
                        help="mean seconds between a turn's answer and the next turn")
    parser.add_argument("--pin-slot", action="store_true",
                        help="also run cache_affinity with pin_slot = true (model 'pin')")
    parser.add_argument("--seed", type=int, default=22)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    ports = [free_port(), free_port()]
    gateway = Gateway(env={"MAX_REQUESTS_PER_MINUTE": "1000000", "QUEUE_TIMEOUT": "600",
                           "REQUEST_TIMEOUT": "900", "FIRST_BYTE_TIMEOUT": "900",
                           "MAX_QUEUE_SIZE": "1000"})
    config = gateway.root / "backends.toml"
    strategies = {**STRATEGIES, **(PINNED if args.pin_slot else {})}
    config.write_text(backends_file(smollm2_path(), ports, args.threads, strategies))
    gateway.env["LLAMAPROXY_CONFIG"] = str(config)
    del gateway.env["MODEL_PATH"]
    gateway.start(wait_ready=False)
    try:
        gateway.wait_ready(timeout=300)
        wait_for(lambda: all(b["state"] == "ready" for b in cast(
            list[dict[str, object]], gateway.health()["backends"])), 300,
            "both replicas to be ready")
        order = list(strategies)
        blocks: list[Block] = []
        errors: list[str] = []
        started = time.perf_counter()
        for round_index in range(args.rounds):
            shift = round_index % len(order)
            for name in order[shift:] + order[:shift]:
                block = Block(name)
                threads = [threading.Thread(target=converse, args=(
                    gateway.url, block, name, system_prompt(rng, args.words), args.turns,
                    args.max_tokens,
                    [args.think * rng.uniform(0.5, 1.5) for _ in range(args.turns)], errors))
                    for _ in range(args.conversations)]
                block_started = time.perf_counter()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                print(f"block {name}: {len(block.turns)} turns in "
                      f"{time.perf_counter() - block_started:.1f} s", flush=True)
                blocks.append(block)
        if errors:
            print("errors:", errors)
        print(f"\n{args.conversations} conversations x {args.turns} turns, {args.rounds} "
              f"block(s) per strategy, think {args.think} s, "
              f"{time.perf_counter() - started:.0f} s in all")
        first_prompts = [t.evaluated + t.reused for b in blocks for t in b.turns if t.turn == 1]
        print(f"turn-1 prompt: {min(first_prompts)}-{max(first_prompts)} tokens\n")
        print("| strategy | TTFT turn 1 p50 / p95 | TTFT turns ≥ 2 p50 / p95 | prompt tokens "
              "evaluated | reused from cache | reuse |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, strategy in strategies.items():
            if name in PINNED:
                strategy += " (pin_slot)"
            turns = [t for b in blocks if b.strategy == name for t in b.turns]
            one = [t.ttft for t in turns if t.turn == 1]
            later = [t.ttft for t in turns if t.turn >= 2]
            evaluated = sum(t.evaluated for t in turns)
            reused = sum(t.reused for t in turns)
            print(f"| {strategy} | {statistics.median(one) * 1000:.0f} / "
                  f"{percentile(one, 0.95) * 1000:.0f} ms | "
                  f"{statistics.median(later) * 1000:.0f} / "
                  f"{percentile(later, 0.95) * 1000:.0f} ms | {evaluated} | {reused} | "
                  f"{reused / max(evaluated + reused, 1):.0%} |")
        metrics = httpx.get(f"{gateway.url}/metrics", timeout=10,
                            headers={"Authorization": f"Bearer {API_KEY}",
                                     "Accept": "text/plain"}).text
        print("\ngateway metrics:")
        for line in metrics.splitlines():
            if line.startswith(("llamaproxy_affinity_", "llamaproxy_backend_prompt")):
                print("  " + line)
    finally:
        gateway.stop()


if __name__ == "__main__":
    main()
