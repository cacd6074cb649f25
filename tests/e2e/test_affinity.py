"""``cache_affinity`` end to end: two real llama-server children serving the same model.

Turn 2 of a conversation lands on the child that served turn 1 and reuses its prompt cache
(``timings.cache_n`` > 0); the dry run and the access log say ``affinity_hit``; the metrics count
reused prompt tokens; when a conversation's child is killed, the conversation moves to the other
child, and stays there (with its cache) once the killed child is back.
"""

from __future__ import annotations

import os
import signal

import httpx
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.harness import API_KEY, Gateway, free_port, tiny_model, wait_for
from tests.e2e.test_routing import _child_on_port

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def child(name: str, port: int) -> str:
    return f"""
[[backends]]
name = "{name}"
model_path = "{tiny_model()}"
models = ["{name}", "m"]
port = {port}
ctx = 4096
ngl = 0
threads = 1
parallel = 1
"""


def system_prompt(index: int) -> str:
    return f"Conversation {index}. " + "You answer questions about the proxy. " * 12


class Conversation:
    """A multi-turn chat: each turn sends the whole history, as chat clients do."""

    def __init__(self, gateway: Gateway, index: int) -> None:
        self.gateway = gateway
        self.messages = [{"role": "system", "content": system_prompt(index)}]
        self.turns = 0

    def body(self) -> dict[str, object]:
        question = f"Question {self.turns + 1}: how does the queue work?"
        return {"model": "m", "messages": [*self.messages, {"role": "user", "content": question}],
                "max_tokens": 4, "temperature": 0}

    def turn(self) -> tuple[str, int]:
        """Send the next turn: (the child that answered, its timings.cache_n)."""
        body = self.body()
        response = httpx.post(f"{self.gateway.url}/v1/chat/completions", json=body,
                              headers=HEADERS, timeout=60)
        assert response.status_code == 200, response.text
        doc = response.json()
        self.messages = [*body["messages"],  # type: ignore[list-item]
                         {"role": "assistant", "content": doc["choices"][0]["message"]["content"]}]
        self.turns += 1
        return doc["model"], doc["timings"]["cache_n"]


class CacheAffinityTests(SynchronousTestCase):
    def test_turns_return_to_their_cache_and_move_when_it_dies(self) -> None:
        ports = [free_port(), free_port()]
        gateway = Gateway(env={"MAX_REQUESTS_PER_MINUTE": "100000", "ADMIN_KEY_IDS": "tester"})
        config = gateway.root / "backends.toml"
        config.write_text(
            "[breaker]\nenabled = false\n"  # only the learned home keeps it away
            "[affinity]\nmin_prompt_chars = 200\n"
            '[models.m]\nstrategy = "cache_affinity"\n'
            + child("a", ports[0]) + child("b", ports[1]))
        gateway.env["LLAMAPROXY_CONFIG"] = str(config)
        del gateway.env["MODEL_PATH"]
        gateway.start()
        self.addCleanup(gateway.stop)
        wait_for(lambda: all(b["state"] == "ready" for b in gateway.health()["backends"]),  # type: ignore[index, union-attr]
                 60, "both children to be ready")

        conversations = [Conversation(gateway, index) for index in range(4)]
        homes = []
        for conversation in conversations:
            home, cached = conversation.turn()
            homes.append(home)
        for conversation, home in zip(conversations, homes, strict=True):
            served, cached = conversation.turn()
            self.assertEqual(served, home)  # turn 2 where turn 1 went...
            self.assertGreater(cached, 0)  # ...and its prompt came from the cache

        # The dry run and the access log say why.
        route = httpx.post(f"{gateway.url}/v1/route", json=conversations[0].body(),
                           headers=HEADERS, timeout=10).json()
        self.assertEqual((route["backend"], route["affinity"]["decision"]),
                         (homes[0], "affinity_hit"))
        wait_for(lambda: sum(1 for line in gateway.access_log()
                             if "route=affinity_hit" in line) >= 4, 10,
                 "the turn-2 lines in the access log")
        metrics = httpx.get(f"{gateway.url}/metrics", headers={**HEADERS, "Accept":
                            "text/plain"}, timeout=10).text
        reused = [line for line in metrics.splitlines()
                  if line.startswith("llamaproxy_backend_prompt_tokens_total")
                  and 'kind="reused"' in line]
        self.assertTrue(reused and any(float(line.split()[-1]) > 0 for line in reused), reused)
        health = {b["name"]: b for b in gateway.health()["backends"]}  # type: ignore[union-attr, index]
        self.assertGreater(health[homes[0]]["prompt_tokens"]["reused"], 0)  # type: ignore[index]

        # Kill conversation 0's child: its next turn moves to the other child...
        dead = homes[0]
        other = "b" if dead == "a" else "a"
        os.kill(_child_on_port(gateway, ports[0 if dead == "a" else 1]), signal.SIGKILL)
        served, _ = conversations[0].turn()
        self.assertEqual(served, other)
        # ...and stays there once the killed child is back: its cache is there now.
        wait_for(lambda: all(b["state"] == "ready" for b in gateway.health()["backends"]),  # type: ignore[index, union-attr]
                 60, "the killed child to be back")
        route = httpx.post(f"{gateway.url}/v1/route", json=conversations[0].body(),
                           headers=HEADERS, timeout=10).json()
        self.assertEqual([c["backend"] for c in route["candidates"]], [other, dead])
        self.assertEqual(route["affinity"]["remembered_backend"], other)
        served, cached = conversations[0].turn()
        self.assertEqual(served, other)
        self.assertGreater(cached, 0)

        def chat_lines() -> list[str]:
            return [" | ".join(line) for line in gateway.access_log()
                    if "POST /v1/chat/completions" in line]

        wait_for(lambda: len(chat_lines()) == 10, 10, "every turn in the access log")
        self.assertIn("| route=affinity_hit", chat_lines()[-1])
