"""The gateway's Site: our Request class, our limits, HTTP/1.1 only, our own request log."""

from __future__ import annotations

from twisted.web import http, server

from llamaproxy.gateway.request import EarlyCheck, GatewayRequest
from llamaproxy.gateway.resource import GatewayResource


class GatewaySite(server.Site):
    """A Site that checks requests before their bodies and never negotiates HTTP/2 by accident."""

    requestFactory = GatewayRequest
    displayTracebacks = False
    noisy = False

    def __init__(self, resource: GatewayResource, max_request_body_size: int) -> None:
        super().__init__(resource)
        self.max_request_body_size = max_request_body_size
        self.early_check: EarlyCheck = resource.early_check

    def acceptableProtocols(self) -> list[bytes]:
        """HTTP/1.1 only: h2 (if installed) has different producer semantics."""
        return [b"http/1.1"]

    def log(self, request: http.Request) -> None:
        """The gateway resource logs each exchange with its real outcome; no second line."""
