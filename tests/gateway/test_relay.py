"""Tests for llamaproxy.gateway.relay on its own: chunks, usage tail, abort, idempotence."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llamaproxy.gateway.relay import StreamRelay
from llamaproxy.gateway.request import GatewayRequest
from llamaproxy.gateway.site import GatewaySite
from llamaproxy.gateway.tokens import UsageCollector
from llamaproxy.testing import InMemoryClient, StreamingResponse, sse_chunk


class RelayResource(Resource):
    """Relays one StreamingResponse to whoever asks."""

    isLeaf = True

    @staticmethod
    def early_check(request: GatewayRequest) -> None:
        """Let everything through (GatewaySite asks before reading a body)."""

    def __init__(self, clock: Clock, usage: UsageCollector | None) -> None:
        super().__init__()
        self.clock = clock
        self.usage = usage
        self.backend = StreamingResponse()
        self.relay: StreamRelay | None = None

    def render(self, request: GatewayRequest) -> int:  # type: ignore[override]
        self.relay = StreamRelay(request, self.clock, 5.0, self.usage)
        self.backend.deliverBody(self.relay)
        return NOT_DONE_YET


class RelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def start(self, usage: UsageCollector | None = None) -> tuple[RelayResource, InMemoryClient]:
        resource = RelayResource(self.clock, usage)
        site = GatewaySite(resource, reactor=self.clock)  # type: ignore[arg-type]
        client = InMemoryClient(site)
        client.request("GET", "/stream")
        return resource, client

    def test_chunks_then_usage_tail_then_finish(self) -> None:
        usage = UsageCollector(streaming=True)
        resource, client = self.start(usage)
        resource.backend.send(sse_chunk("a") + b"data: {\"choices\": [], \"usage\": ")
        self.assertIn(b"\"a\"", client.written)
        resource.backend.send(b"{\"prompt_tokens\": 1, \"completion_tokens\": 2}}\n\n")
        resource.backend.finish()
        response = client.response()
        self.assertTrue(response.complete)
        self.assertIn(b"usage", response.body)  # relayed as it came
        self.assertEqual(usage.completion_tokens, 2)
        assert resource.relay is not None
        self.assertEqual(resource.relay.outcome, "complete")
        self.assertEqual(resource.relay.bytes_sent, len(response.body))

    def test_abort_cuts_both_sides_once(self) -> None:
        resource, client = self.start()
        resource.backend.send(sse_chunk("a"))
        assert resource.relay is not None
        resource.relay.abort("shutdown")
        resource.relay.abort("timeout")
        resource.relay.stopProducing()
        self.assertEqual(resource.relay.outcome, "shutdown")
        self.assertTrue(resource.backend.transport.stopped)
        self.assertTrue(client.closed)
        self.assertEqual(self.successResultOf(resource.relay.done), "shutdown")

    def test_done_and_on_end_say_the_relay_ended_once(self) -> None:
        # done is made when asked for: before the end it fires at the end, after it at once;
        # on_end is called once, after done fired, and is not kept.
        for asked_before in (True, False):
            resource, client = self.start()
            relay = resource.relay
            assert relay is not None
            calls: list[object] = []
            relay.on_end = lambda: calls.append(relay.done.result)  # noqa: B023
            early = relay.done if asked_before else None
            resource.backend.send(sse_chunk("a"))
            self.assertEqual(calls, [])
            if early is not None:
                self.assertNoResult(early)
            resource.backend.finish()
            self.assertTrue(client.response().complete)
            self.assertEqual(calls, ["complete"])
            self.assertIsNone(relay.on_end)
            self.assertEqual(self.successResultOf(relay.done), "complete")
            relay.abort("shutdown")  # (ended already: nothing more)
            self.assertEqual(calls, ["complete"])
