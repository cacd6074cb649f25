"""The gateway's Site and channel: our Request class, our limits, HTTP/1.1 only, our own log.

``GatewayChannel`` adds what twisted.web lacks against slow clients: its own idle timeout only
fires when nothing arrives at all, so a client trickling one byte a second could hold a
connection for hours. Here a client must send a whole request (headers and body) within
``client_timeout`` seconds of its first byte, or it gets 408 and the connection is closed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server

from llamaproxy.gateway import errors
from llamaproxy.gateway.request import EarlyCheck, GatewayRequest, raw_response
from llamaproxy.gateway.resource import GatewayResource

log = Logger()

_CONNECTION_DONE = Failure(ConnectionDone())


class GatewayChannel(http.HTTPChannel):
    """An HTTPChannel that gives each request ``client_timeout`` seconds to arrive completely."""

    client_timeout: float = 30.0
    _arrival_timer: IDelayedCall | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._arrival_timer is None and not self._handlingRequest and self.client_timeout > 0:
            self._arrival_timer = self.callLater(self.client_timeout, self._too_slow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel_arrival_timer()
        super().allContentReceived()

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._cancel_arrival_timer()
        super().connectionLost(reason)

    def _cancel_arrival_timer(self) -> None:
        if self._arrival_timer is not None and self._arrival_timer.active():
            self._arrival_timer.cancel()
        self._arrival_timer = None

    def _too_slow(self) -> None:
        self._arrival_timer = None
        if self.transport is None:
            return
        peer = self.transport.getPeer()
        log.info("Client {peer} too slow to send its request: 408", peer=str(peer))
        self.transport.write(raw_response(errors.request_timeout(self.client_timeout)))
        # Stop parsing whatever else trickles in; close once the 408 is written.
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        self.transport.loseConnection()


class GatewaySite(server.Site):
    """A Site that checks requests before their bodies and never negotiates HTTP/2 by accident."""

    requestFactory = GatewayRequest
    # Plain HTTPChannel, not the h2-negotiating wrapper: we only ever speak HTTP/1.1.
    protocol = GatewayChannel  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        resource: GatewayResource,
        max_request_body_size: int,
        client_timeout: float = 30.0,
        reactor: Any = None,
    ) -> None:
        super().__init__(resource, reactor=reactor)
        self.max_request_body_size = max_request_body_size
        self.client_timeout = client_timeout
        self.early_check: EarlyCheck = resource.early_check

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.client_timeout = self.client_timeout
        return channel

    def acceptableProtocols(self) -> list[bytes]:
        """HTTP/1.1 only: h2 (if installed) has different producer semantics."""
        return [b"http/1.1"]

    def log(self, request: http.Request) -> None:
        """The gateway resource logs each exchange with its real outcome; no second line."""
