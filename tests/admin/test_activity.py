"""Tests for llamaproxy.admin.activity: the bounded ring of finished requests."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.admin.activity import ActivityRing
from llamaproxy.gateway.request_body import BodyFacts
from tests.admin.fixtures import entry


def request(wait: float | None = None, body: object = None) -> SimpleNamespace:
    timer = None if wait is None else SimpleNamespace(queue_wait=wait)
    exchange = None if timer is None else SimpleNamespace(timer=timer)
    stream = isinstance(body, dict) and body.get("stream") is True
    return SimpleNamespace(exchange=exchange, facts=BodyFacts(stream=stream))


class ActivityRingTests(SynchronousTestCase):
    def test_bounded_newest_first(self) -> None:
        ring = ActivityRing(3)
        for n in range(5):
            ring.observe(entry(request_id=str(n), ts=float(n)), request())
        self.assertEqual(len(ring), 3)
        self.assertEqual([r.ts for r in ring.rows()], [4.0, 3.0, 2.0])
        self.assertEqual(len(list(ring)), 3)

    def test_probes_are_not_activity(self) -> None:
        ring = ActivityRing()
        for path in ("/readyz", "/health", "/ping", "/metrics"):
            ring.observe(entry(key_id=None, path=path), request())
        self.assertEqual(len(ring), 0)

    def test_filters(self) -> None:
        ring = ActivityRing()
        ring.add(entry("alice", "tiny"))
        ring.add(entry("bob", "tiny"))
        ring.add(entry("alice", "big"))
        self.assertEqual([(r.key_id, r.model) for r in ring.rows(key_id="alice")],
                         [("alice", "big"), ("alice", "tiny")])
        self.assertEqual([r.key_id for r in ring.rows(model="tiny")], ["bob", "alice"])
        self.assertEqual(ring.rows(key_id="alice", model="tiny", limit=1)[0].model, "tiny")
        self.assertEqual(ring.key_ids(), ["alice", "bob"])
        self.assertEqual(ring.models(), ["big", "tiny"])

    def test_stream_rate_counts_from_the_first_token(self) -> None:
        ring = ActivityRing()
        ring.observe(entry(duration_ms=1200.0, ttfb_ms=200.0, completion_tokens=50),
                     request(wait=0.1, body={"stream": True}))
        [row] = ring.rows()
        self.assertEqual(row.tokens_per_second, 50.0)
        self.assertEqual(row.queue_wait_ms, 100.0)
        self.assertEqual(row.ttft_ms, 200.0)

    def test_plain_rate_counts_the_request_minus_its_wait(self) -> None:
        ring = ActivityRing()
        ring.observe(entry(duration_ms=1100.0, completion_tokens=50),
                     request(wait=0.1, body={"stream": False}))
        self.assertEqual(ring.rows()[0].tokens_per_second, 50.0)

    def test_no_tokens_no_rate_and_client_gone(self) -> None:
        ring = ActivityRing()
        ring.add(entry(status=499, completion_tokens=None, outcome="client_gone", key_id=None))
        [row] = ring.rows()
        self.assertIsNone(row.tokens_per_second)
        self.assertTrue(row.client_gone)
        self.assertEqual(row.key_id, "-")
        self.assertIsNone(row.queue_wait_ms)
        self.assertEqual(row.as_json()["client_gone"], True)
        self.assertEqual(row.as_json()["tokens_per_second"], None)

    def test_size_must_be_positive(self) -> None:
        self.assertRaises(ValueError, ActivityRing, 0)
