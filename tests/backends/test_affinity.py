"""Tests for llamaproxy.backends.affinity and the ``cache_affinity`` strategy of
llamaproxy.backends.routing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from collections import Counter

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.backends import affinity
from llamaproxy.backends.admission import Admission, Slot
from llamaproxy.backends.affinity import (
    AffinityMemory,
    AffinitySettings,
    HashRing,
    PrefixRule,
    bounded_choice,
    prefix_hash,
)
from llamaproxy.backends.backend import BackendState
from llamaproxy.backends.config_file import BackendsFileError, parse_backends_text
from llamaproxy.backends.routing import Router, status_for
from llamaproxy.gateway.request_body import BodyFacts, read_facts, with_slot
from llamaproxy.observability.access_log import AccessEntry, format_access_json, format_access_text

RULE = PrefixRule(prefix_chars=4096, prefix_messages=4, min_prompt_chars=100)
SYSTEM = "You are a careful assistant. " * 20  # 580 characters


def chat(*texts: str, system: str = SYSTEM) -> dict[str, object]:
    """A conversation: the system prompt, then user/assistant turns alternating."""
    messages = [{"role": "system", "content": system}]
    for index, text in enumerate(texts):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": text})
    return {"model": "m", "messages": messages}


class PrefixHashTests(SynchronousTestCase):
    def test_later_turns_hash_like_the_first(self) -> None:
        first = prefix_hash(chat("What is a slot?"), RULE)
        second = prefix_hash(chat("What is a slot?", "A slot is...", "And a KV cache?"), RULE)
        self.assertIsNotNone(first)
        self.assertEqual(first, second)

    def test_distinct_conversations_differ(self) -> None:
        a = prefix_hash(chat("What is a slot?"), RULE)
        self.assertNotEqual(a, prefix_hash(chat("What is a queue?"), RULE))
        self.assertNotEqual(a, prefix_hash(chat("What is a slot?", system="Be brief. " * 60),
                                           RULE))

    def test_short_prompts_have_no_prefix(self) -> None:
        self.assertIsNone(prefix_hash(chat("hi", system="Be brief."), RULE))
        self.assertIsNone(prefix_hash({"messages": []}, RULE))
        self.assertIsNone(prefix_hash({"prompt": "short"}, RULE))
        self.assertIsNone(prefix_hash({"prompt": ["a", "list"]}, RULE))

    def test_length_in_characters(self) -> None:
        rule = PrefixRule(prefix_chars=200, prefix_messages=4, min_prompt_chars=100)
        a = prefix_hash(chat("one", system="x" * 300), rule)
        self.assertEqual(a, prefix_hash(chat("two", system="x" * 250 + "y" * 50), rule))
        self.assertNotEqual(a, prefix_hash(chat("one", system="x" * 150 + "y" * 150), rule))

    def test_length_in_messages(self) -> None:
        rule = PrefixRule(prefix_chars=4096, prefix_messages=1, min_prompt_chars=100)
        self.assertEqual(prefix_hash(chat("one"), rule), prefix_hash(chat("two"), rule))
        self.assertNotEqual(prefix_hash(chat("one"), RULE), prefix_hash(chat("two"), RULE))

    def test_content_parts_and_completions(self) -> None:
        parts = chat("q")
        parts["messages"][1]["content"] = [{"type": "text", "text": "q"}]  # type: ignore[index]
        self.assertEqual(prefix_hash(parts, RULE), prefix_hash(chat("q"), RULE))
        prompt = "Once upon a time " * 20
        self.assertEqual(prefix_hash({"prompt": prompt}, RULE),
                         prefix_hash({"prompt": prompt + "and then"}, RULE))

    def test_same_hash_in_every_process(self) -> None:
        """Several gateway processes agree without sharing state (no per-process hash seed)."""
        code = ("from llamaproxy.backends.affinity import prefix_hash, PrefixRule;"
                "print(prefix_hash({'prompt': 'p' * 200}, PrefixRule(4096, 4, 100)))")
        seen = set()
        for seed in ("1", "2"):
            env = dict(os.environ, PYTHONHASHSEED=seed)
            out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                 capture_output=True, text=True).stdout
            seen.add(int(out))
        self.assertEqual(seen, {prefix_hash({"prompt": "p" * 200}, RULE)})

    def test_read_facts_keeps_only_the_hash(self) -> None:
        raw = json.dumps(chat("What is a slot?")).encode()
        facts = read_facts(b"/v1/chat/completions", raw, None, RULE)
        assert isinstance(facts, BodyFacts)
        self.assertEqual(facts.prefix_hash, prefix_hash(chat("What is a slot?"), RULE))
        without = read_facts(b"/v1/chat/completions", raw, None)
        assert isinstance(without, BodyFacts)
        self.assertIsNone(without.prefix_hash)
        embeddings = read_facts(b"/v1/embeddings", json.dumps({"input": "x" * 500}).encode(),
                                None, RULE)
        assert isinstance(embeddings, BodyFacts)
        self.assertIsNone(embeddings.prefix_hash)


class RingTests(SynchronousTestCase):
    KEYS = [affinity._hash64(str(i).encode()) for i in range(20000)]

    def test_distribution(self) -> None:
        ring = HashRing(["a", "b", "c", "d"])
        shares = Counter(ring.owner(key) for key in self.KEYS)
        for name in "abcd":
            self.assertTrue(0.15 < shares[name] / len(self.KEYS) < 0.35, shares)

    def test_walk_gives_every_backend_once(self) -> None:
        ring = HashRing(["a", "b", "c"])
        for key in self.KEYS[:200]:
            self.assertEqual(sorted(ring.walk(key)), ["a", "b", "c"])

    def test_removal_moves_only_its_keys_and_return_brings_them_back(self) -> None:
        full = HashRing(["a", "b", "c", "d"])
        without_c = HashRing(["a", "b", "d"])
        moved = 0
        for key in self.KEYS:
            before, after = full.owner(key), without_c.owner(key)
            if before != "c":
                self.assertEqual(before, after)  # nobody else's keys move
            else:
                moved += 1
                # c's keys go to the next backend on c's walk: the failover order.
                self.assertEqual(after, list(full.walk(key))[1])
        self.assertTrue(moved > 0)
        back = HashRing(["a", "b", "c", "d"])
        self.assertEqual([back.owner(k) for k in self.KEYS], [full.owner(k) for k in self.KEYS])


class Load:
    def __init__(self, in_flight: int, slots: int) -> None:
        self.in_flight, self.slots = in_flight, slots


class BoundedLoadTests(SynchronousTestCase):
    def test_within_bound_stays(self) -> None:
        self.assertEqual(bounded_choice([Load(0, 2), Load(0, 2)], 1.25), (0, False))
        self.assertEqual(bounded_choice([Load(3, 2), Load(2, 2)], 1.25), (0, False))

    def test_overflow_to_the_next(self) -> None:
        # 6 in flight + 1: fair share 3.5 per backend, bound ceil(1.25 * 3.5) = 5.
        self.assertEqual(bounded_choice([Load(5, 2), Load(1, 2)], 1.25), (1, True))
        self.assertEqual(bounded_choice([Load(4, 2), Load(2, 2)], 1.25), (0, False))
        # A larger factor tolerates more imbalance.
        self.assertEqual(bounded_choice([Load(5, 2), Load(1, 2)], 2.0), (0, False))

    def test_slots_weigh_the_share(self) -> None:
        self.assertEqual(bounded_choice([Load(6, 8), Load(1, 1)], 1.0), (0, False))
        self.assertEqual(bounded_choice([Load(1, 1), Load(6, 8)], 1.0), (1, True))

    def test_some_backend_always_has_room(self) -> None:
        for a in range(12):
            for b in range(12):
                index, _ = bounded_choice([Load(a, 2), Load(b, 3)], 1.0)
                member = [Load(a, 2), Load(b, 3)][index]
                self.assertLessEqual(member.in_flight + 1, affinity.capacity(
                    member, a + b, 5, 1.0))


class MemoryTests(SynchronousTestCase):
    def test_bounded_lru(self) -> None:
        memory = AffinityMemory(capacity=3)
        for prefix in range(4):
            memory.remember("m", prefix, f"b{prefix}")
        self.assertEqual(len(memory), 3)
        self.assertIsNone(memory.home("m", 0))  # the oldest went
        memory.remember("m", 1, "b9")  # used again: most recent
        memory.remember("m", 4, "b4")
        self.assertEqual((memory.home("m", 1), memory.home("m", 2)), ("b9", None))
        self.assertIsNone(memory.home("other", 1))  # models never share a home
        memory.resize(1)
        self.assertEqual(len(memory), 1)
        self.assertEqual(memory.approximate_bytes, affinity.BYTES_PER_ENTRY)

    def test_bytes_per_entry_is_about_right(self) -> None:
        memory = AffinityMemory(capacity=100_000)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for prefix in range(50_000):
                memory.remember("m", affinity._hash64(str(prefix).encode()), "backend")
            used = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        per_entry = used / len(memory)
        self.assertTrue(affinity.BYTES_PER_ENTRY / 2 < per_entry < affinity.BYTES_PER_ENTRY * 2,
                        per_entry)

    def test_counts(self) -> None:
        memory = AffinityMemory()
        memory.served("a", 100, 0)
        memory.served("a", 10, 90)
        memory.served("a", None, None)  # said nothing
        self.assertEqual(memory.counts["a"], affinity.PromptCounts(110, 90, 2))
        self.assertAlmostEqual(memory.counts["a"].reuse_ratio, 90 / 200)
        self.assertEqual(memory.prompt_tokens_json("a"), {"evaluated": 110, "reused": 90,
                                                          "reuse_ratio": 0.45})
        self.assertIsNone(memory.prompt_tokens_json("b"))
        memory.remember("m", 1, "a")
        self.assertEqual(memory.memory_json(), {"remembered": 1, "capacity": 10000,
                                                "approximate_bytes": affinity.BYTES_PER_ENTRY})


TWO = """
[affinity]
min_prompt_chars = 100
load_factor = 1.25

[[backends]]
name = "a"
base_url = "http://a:9000/v1"
models = ["m"]
slots = 2

[[backends]]
name = "b"
base_url = "http://b:9000/v1"
models = ["m"]
slots = 2

[models.m]
strategy = "cache_affinity"
"""


class Fixture:
    """A cache_affinity router over two ready backends, each with its own Admission."""

    def __init__(self, text: str = TWO) -> None:
        self.clock = Clock()
        self.table = parse_backends_text(text, "backends.toml", {}, is_file=lambda path: True)
        self.statuses = {spec.name: status_for(spec) for spec in self.table.backends}
        for status in self.statuses.values():
            status.set_state(BackendState.READY)
        self.loads = {spec.name: Admission(spec.max_concurrent) for spec in self.table.backends}
        self.router = Router.build(self.table, self.clock, self.statuses, self.loads)
        assert self.table.prefix_rule is not None
        self.rule = self.table.prefix_rule

    def prefix(self, *texts: str) -> int:
        value = prefix_hash(chat(*texts), self.rule)
        assert value is not None
        return value

    def route(self, prefix: int | None) -> tuple[list[str], str | None]:
        choice = self.router.choose("m", None, prefix)
        return [m.name for m in choice.members], choice.decision

    def serve(self, prefix: int | None, name: str) -> None:
        self.router.served("m", prefix, self.router.member(name), 100, 0)

    def busy(self, name: str, requests: int) -> list[Slot]:
        slots: list[Slot] = []
        for _ in range(requests):
            self.loads[name].acquire("k").addCallback(slots.append)
        return slots


class StrategyTests(SynchronousTestCase):
    def test_first_turn_follows_the_ring_then_sticks(self) -> None:
        fixture = Fixture()
        ring = HashRing(["a", "b"])
        for index in range(20):
            prefix = fixture.prefix(f"question {index}")
            order, decision = fixture.route(prefix)
            self.assertEqual((order, decision), (list(ring.walk(prefix)), "affinity_miss"))
            fixture.serve(prefix, order[0])
            self.assertEqual(fixture.route(prefix), (order, "affinity_hit"))

    def test_conversations_spread_over_both(self) -> None:
        fixture = Fixture()
        firsts = Counter(fixture.route(fixture.prefix(f"q{i}"))[0][0] for i in range(40))
        self.assertEqual(set(firsts), {"a", "b"})

    def test_overflow_when_home_is_over_its_bound(self) -> None:
        fixture = Fixture()
        prefix = fixture.prefix("q")
        home, other = fixture.route(prefix)[0]
        fixture.serve(prefix, home)
        fixture.busy(home, 5)  # 2 slots held, 3 queued
        fixture.busy(other, 1)
        self.assertEqual(fixture.route(prefix), ([other, home], "overflow"))
        fixture.busy(other, 3)
        self.assertEqual(fixture.route(prefix), ([home, other], "affinity_hit"))

    def test_new_prefixes_are_placed_evenly(self) -> None:
        """Conversations starting together split evenly (no cache anywhere to favour yet);
        their homes, once remembered, tolerate load_factor."""
        fixture = Fixture()
        ring = HashRing(["a", "b"])
        prefixes = [p for p in (fixture.prefix(f"q{i}") for i in range(100))
                    if ring.owner(p) == "a"][:8]  # all hashed to a
        placed: Counter[str] = Counter()
        for prefix in prefixes:
            name = fixture.route(prefix)[0][0]
            placed[name] += 1
            fixture.busy(name, 1)  # it stays in flight
        self.assertEqual(placed, {"a": 4, "b": 4})

    def test_a_conversation_moves_when_its_home_is_down_and_stays_moved(self) -> None:
        fixture = Fixture()
        prefix = fixture.prefix("q")
        home, other = fixture.route(prefix)[0]
        fixture.serve(prefix, home)
        fixture.statuses[home].set_state(BackendState.BACKOFF)
        self.assertEqual(fixture.route(prefix), ([other, home], "affinity_miss"))
        fixture.serve(prefix, other)  # the new home is remembered
        fixture.statuses[home].set_state(BackendState.READY)
        self.assertEqual(fixture.route(prefix), ([other, home], "affinity_hit"))

    def test_breaker_open_home_is_skipped(self) -> None:
        fixture = Fixture()
        prefix = fixture.prefix("q")
        home, other = fixture.route(prefix)[0]
        fixture.serve(prefix, home)
        breaker = fixture.router.member(home).breaker
        for _ in range(breaker.settings.failure_threshold):
            ticket = breaker.acquire()
            assert ticket is not None
            ticket.record_failure()
        self.assertEqual(fixture.route(prefix), ([other], "affinity_miss"))

    def test_short_prompts_go_to_the_least_busy(self) -> None:
        fixture = Fixture()
        fixture.busy("a", 2)
        self.assertEqual(fixture.route(None), (["b", "a"], "short_prompt"))
        fixture.busy("b", 3)
        self.assertEqual(fixture.route(None), (["a", "b"], "short_prompt"))

    def test_decisions_are_counted_and_other_strategies_learn_nothing(self) -> None:
        fixture = Fixture(TWO + '\n[[backends]]\nname = "c"\nbase_url = "http://c/v1"\n'
                          'models = ["n"]\n')
        prefix = fixture.prefix("q")
        fixture.route(prefix)
        fixture.route(None)
        self.assertEqual(fixture.router.memory.decisions,
                         {("m", "affinity_miss"): 1, ("m", "short_prompt"): 1})
        fixture.router.served("n", prefix, fixture.router.member("c"), 5, 7)
        self.assertEqual(len(fixture.router.memory), 0)
        self.assertEqual(fixture.router.memory.counts["c"].reused, 7)

    def test_memory_survives_a_reload_but_not_its_backend(self) -> None:
        fixture = Fixture()
        prefix = fixture.prefix("q")
        home = fixture.route(prefix)[0][0]
        fixture.serve(prefix, home)
        reloaded = Router.build(fixture.table, fixture.clock, fixture.statuses, fixture.loads,
                                previous=fixture.router)
        self.assertEqual(reloaded.memory.home("m", prefix), home)
        kept = "b" if home == "a" else "a"
        text = TWO.replace(f'name = "{home}"\nbase_url = "http://{home}:9000/v1"',
                           f'name = "{home}"\nbase_url = "http://{home}-new:9000/v1"')
        table = parse_backends_text(text, "backends.toml", {}, is_file=lambda path: True)
        replaced = Router.build(table, fixture.clock, fixture.statuses, fixture.loads,
                                previous=reloaded)
        self.assertIsNone(replaced.memory.home("m", prefix))
        fixture.serve(prefix, kept)
        self.assertEqual(replaced.memory.counts.keys(), {kept})

    def test_pin_slot(self) -> None:
        fixture = Fixture()
        prefix = fixture.prefix("q")
        member = fixture.router.member("a")
        self.assertIsNone(fixture.router.pinned_slot("m", prefix, member))  # off by default
        pinned = Fixture(TWO.replace("load_factor = 1.25", "load_factor = 1.25\npin_slot = true"))
        slot = pinned.router.pinned_slot("m", prefix, pinned.router.member("a"))
        self.assertEqual(slot, affinity.slot_for(prefix, 2))
        self.assertIsNone(pinned.router.pinned_slot("m", None, pinned.router.member("a")))
        per_model = Fixture(TWO + "pin_slot = true\n")  # in [models.m]
        self.assertEqual(per_model.router.pinned_slot("m", prefix, per_model.router.member("a")),
                         slot)
        self.assertEqual(json.loads(with_slot(b'{"model": "m"}', 1)), {"model": "m", "id_slot": 1})

    def test_explain(self) -> None:
        fixture = Fixture()
        body = chat("q")
        prefix = fixture.prefix("q")
        answer = fixture.router.explain(body, None)
        self.assertEqual(answer["strategy"], "cache_affinity")
        self.assertEqual(answer["affinity"], {
            "prefix_hash": f"{prefix:016x}", "decision": "affinity_miss",
            "remembered_backend": None,
            "memory": {"remembered": 0, "capacity": 10000, "approximate_bytes": 0}})
        home = answer["backend"]
        assert isinstance(home, str)
        fixture.serve(prefix, home)
        self.assertEqual(
            {doc["name"]: doc.get("prompt_tokens") for doc in fixture.router.status_json()},
            {home: {"evaluated": 100, "reused": 0, "reuse_ratio": 0.0},
             ("b" if home == "a" else "a"): None})
        answer = fixture.router.explain(body, None)
        self.assertEqual(answer["affinity"]["decision"], "affinity_hit")  # type: ignore[index]
        self.assertEqual(answer["candidates"][0]["why"],  # type: ignore[index]
                         "served this prefix last, 0/2 slots busy")
        short = fixture.router.explain({"model": "m", "messages": []}, None)
        self.assertEqual(short["affinity"]["decision"], "short_prompt")  # type: ignore[index]
        self.assertEqual(fixture.router.memory.decisions, {})  # a dry run counts nothing


class SettingsTests(SynchronousTestCase):
    def parse(self, affinity_table: str) -> AffinitySettings:
        text = affinity_table + TWO.split("\n", 4)[4]
        return parse_backends_text(text, "b.toml", {}, is_file=lambda p: True).affinity

    def test_values(self) -> None:
        settings = self.parse("[affinity]\nprefix_chars = 100\nprefix_messages = 2\n"
                              "min_prompt_chars = 0\nload_factor = 2\nremembered = 0\n"
                              "pin_slot = true\n")
        self.assertEqual(settings, AffinitySettings(100, 2, 0, 2.0, 0, True))
        self.assertEqual(self.parse(""), AffinitySettings())

    def test_errors(self) -> None:
        for table, message in (
            ("prefix_chars = 0", "affinity.prefix_chars: expected an integer between 1"),
            ("load_factor = 0.5", "affinity.load_factor: expected a number from 1 to 100"),
            ("load_factor = 'x'", "affinity.load_factor: expected a number, got a string"),
            ("pin_slot = 1", "affinity.pin_slot: expected true or false"),
            ("size = 1", "affinity.size: unknown key"),
        ):
            with self.assertRaises(BackendsFileError) as raised:
                self.parse(f"[affinity]\n{table}\n")
            self.assertIn(message, str(raised.exception))
        with self.assertRaises(BackendsFileError) as raised:
            parse_backends_text(TWO.replace('"cache_affinity"', '"least-busy"\npin_slot = true'),
                                "b.toml", {}, is_file=lambda p: True)
        self.assertIn('models.m.pin_slot: applies to strategy "cache_affinity" only',
                      str(raised.exception))

    def test_no_rule_without_an_affinity_model(self) -> None:
        text = TWO.replace('strategy = "cache_affinity"', 'strategy = "least-busy"')
        table = parse_backends_text(text, "b.toml", {}, is_file=lambda p: True)
        self.assertIsNone(table.prefix_rule)


class AccessLogTests(SynchronousTestCase):
    def test_route_decision_is_logged(self) -> None:
        entry = AccessEntry(ts=0.0, request_id="r", key_id="k", method="POST",
                            path="/v1/chat/completions", status=200, duration_ms=1.0,
                            route="affinity_hit")
        self.assertIn("| route=affinity_hit", format_access_text(entry))
        self.assertEqual(json.loads(format_access_json(entry))["route"], "affinity_hit")
        plain = AccessEntry(ts=0.0, request_id="r", key_id="k", method="GET", path="/",
                            status=200, duration_ms=1.0)
        self.assertNotIn("route", format_access_text(plain))
        self.assertNotIn("route", json.loads(format_access_json(plain)))


class MetricsTests(SynchronousTestCase):
    def test_families(self) -> None:
        from llamaproxy.backends.affinity_metrics import prompt_cache_families

        fixture = Fixture()
        prefix = fixture.prefix("q")
        fixture.route(prefix)
        fixture.router.served("m", prefix, fixture.router.member("a"), 30, 70)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in prompt_cache_families(fixture.router) for s in family.samples}
        self.assertEqual(samples[("llamaproxy_backend_prompt_tokens_total",
                                  (("backend", "a"), ("kind", "reused")))], 70)
        self.assertEqual(samples[("llamaproxy_backend_prompt_cache_reuse_ratio",
                                  (("backend", "a"),))], 0.7)
        self.assertEqual(samples[("llamaproxy_affinity_decisions_total",
                                  (("decision", "affinity_miss"), ("model", "m")))], 1)
        self.assertEqual(samples[("llamaproxy_affinity_remembered_prefixes", ())], 1)
        self.assertEqual(samples[("llamaproxy_affinity_memory_bytes", ())],
                         affinity.BYTES_PER_ENTRY)
        self.assertEqual(list(prompt_cache_families(object())), [])
