"""Client identity (issue 16.8): the access log's client address, TRUSTED_PROXIES, and the
forwarding headers the backend receives."""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.gateway.client_address import TrustedProxies, parse_trusted_proxies
from llamaproxy.gateway.recorder import RequestRecorder
from llamaproxy.observability.access_log import AccessLog
from llamaproxy.testing import InMemoryClient
from tests.gateway.test_resource import AUTH, CHAT, GatewayFixture


def _trusted(*cidrs: str) -> TrustedProxies:
    return TrustedProxies(parse_trusted_proxies(cidrs))


class IdentifyTests(SynchronousTestCase):
    def test_untrusted_peer_is_the_client(self) -> None:
        for proxies in (TrustedProxies(), _trusted("10.0.0.0/8")):
            who = proxies.identify("203.0.113.7", False, [b"1.2.3.4"], [b"for=5.6.7.8"],
                                   [b"https"])
            self.assertEqual((who.address, who.chain, who.proto),
                             ("203.0.113.7", ("203.0.113.7",), "http"))

    def test_trusted_peer_is_believed_up_to_the_first_untrusted_hop(self) -> None:
        proxies = _trusted("10.0.0.0/8", "192.168.1.1")
        who = proxies.identify("10.0.0.2", True, [b"6.6.6.6, 198.51.100.9", b"192.168.1.1"],
                               [], [])
        self.assertEqual(who.address, "198.51.100.9")  # 6.6.6.6 is only what it claimed
        self.assertEqual(who.chain, ("6.6.6.6", "198.51.100.9", "192.168.1.1", "10.0.0.2"))
        self.assertEqual(who.proto, "https")
        self.assertEqual(who.forwarding_headers(), [
            (b"X-Forwarded-For", b"6.6.6.6, 198.51.100.9, 192.168.1.1, 10.0.0.2"),
            (b"X-Forwarded-Proto", b"https")])

    def test_forwarded_header_and_proto(self) -> None:
        proxies = _trusted("::1", "127.0.0.1")
        who = proxies.identify("::1", False, [],
                               [b'for="[2001:db8::5]:4711";proto=https, for=127.0.0.1'],
                               [b"https"])
        self.assertEqual(who.address, "2001:db8::5")
        self.assertEqual(who.chain, ("2001:db8::5", "127.0.0.1", "::1"))
        self.assertEqual(who.proto, "https")

    def test_garbage_in_the_chain_is_skipped(self) -> None:
        who = _trusted("10.0.0.1").identify(
            "10.0.0.1", False, [b"unknown, <script>, 198.51.100.1:8080"], [], [b"gopher"])
        self.assertEqual((who.address, who.chain, who.proto),
                         ("198.51.100.1", ("198.51.100.1", "10.0.0.1"), "http"))

    def test_bad_entries_are_refused(self) -> None:
        self.assertRaises(ValueError, parse_trusted_proxies, ["10.0.0.0/33"])
        self.assertRaises(ValueError, parse_trusted_proxies, ["proxy.internal"])


class ThroughTheGatewayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = GatewayFixture()
        self.path = self.mktemp()
        self.access_log = AccessLog(self.path, "json", self.gw.clock, "test", None)
        self.gw.site.recorder = RequestRecorder(self.gw.clock, self.access_log)

    def entries(self) -> list[dict[str, Any]]:
        self.access_log.flush()
        with open(self.path) as f:
            return [json.loads(line) for line in f]

    def chat_from(self, peer: str, headers: dict[str, str]) -> InMemoryClient:
        client = InMemoryClient(self.gw.site, peer)
        client.request("POST", "/v1/chat/completions", CHAT, {**AUTH, **headers})
        return client

    def sent_headers(self) -> dict[bytes, list[bytes]]:
        headers = self.gw.agent.requests[-1].headers
        assert headers is not None
        return {name.lower(): values for name, values in headers.getAllRawHeaders()}

    def test_an_untrusted_clients_forwarding_headers_never_reach_the_backend(self) -> None:
        client = self.chat_from("198.51.100.20", {
            "X-Forwarded-For": "1.1.1.1", "Forwarded": "for=2.2.2.2", "X-Real-IP": "3.3.3.3",
            "X-Forwarded-Proto": "https"})
        sent = self.sent_headers()
        self.assertEqual(sent[b"x-forwarded-for"], [b"198.51.100.20"])
        self.assertEqual(sent[b"x-forwarded-proto"], [b"http"])
        self.assertNotIn(b"forwarded", sent)
        self.assertNotIn(b"x-real-ip", sent)
        self.gw.agent.requests[0].respond(200, b"{}")
        self.assertEqual(client.response().status, 200)
        self.assertEqual(self.entries()[0]["client"], "198.51.100.20")

    def test_a_trusted_proxys_chain_is_believed(self) -> None:
        self.gw.site.trusted_proxies = _trusted("10.1.0.0/16")
        client = self.chat_from("10.1.2.3", {"X-Forwarded-For": "198.51.100.77",
                                             "X-Forwarded-Proto": "https"})
        sent = self.sent_headers()
        self.assertEqual(sent[b"x-forwarded-for"], [b"198.51.100.77, 10.1.2.3"])
        self.assertEqual(sent[b"x-forwarded-proto"], [b"https"])
        self.gw.agent.requests[0].respond(200, b"{}")
        self.assertEqual(client.response().status, 200)
        self.assertEqual(self.entries()[0]["client"], "198.51.100.77")

    def test_refused_requests_are_logged_with_their_peer(self) -> None:
        client = InMemoryClient(self.gw.site, "198.51.100.30")
        client.send(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
        self.assertEqual(client.response().status, 414)
        self.assertEqual(self.entries()[0]["client"], "198.51.100.30")

    def test_one_connection_keeps_its_direct_client_while_no_proxy_is_trusted(self) -> None:
        """Without trusted proxies the identity is the connection's (kept by its channel);
        once proxies are trusted, each request's own forwarding headers count again."""
        client = InMemoryClient(self.gw.site, "10.1.2.3")
        other = InMemoryClient(self.gw.site, "198.51.100.40")
        for who, forwarded in ((client, "198.51.100.77"), (other, "198.51.100.78"),
                               (client, "198.51.100.79")):
            who.request("POST", "/v1/chat/completions", CHAT,
                        {**AUTH, "X-Forwarded-For": forwarded})
            self.assertEqual(self.sent_headers()[b"x-forwarded-for"],
                             [who.channel.getPeer().host.encode()])
            self.gw.agent.requests[-1].respond(200, b"{}")
        self.assertEqual(client.channel.direct_client.address, "10.1.2.3")
        self.gw.site.trusted_proxies = _trusted("10.1.0.0/16")
        for forwarded in ("198.51.100.80", "198.51.100.81"):
            client.request("POST", "/v1/chat/completions", CHAT,
                           {**AUTH, "X-Forwarded-For": forwarded})
            self.assertEqual(self.sent_headers()[b"x-forwarded-for"],
                             [f"{forwarded}, 10.1.2.3".encode()])
            self.gw.agent.requests[-1].respond(200, b"{}")
        self.assertEqual([e["client"] for e in self.entries()], [
            "10.1.2.3", "198.51.100.40", "10.1.2.3", "198.51.100.80", "198.51.100.81"])
