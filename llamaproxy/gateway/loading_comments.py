"""SSE comment lines for a streaming request that waits for its model to load.

A streaming request (``"stream": true``) whose on-demand model is not ready gets its response
started at once (200, ``text/event-stream``) and a comment line ``: loading NAME 12s`` every
``LOADING_COMMENT_INTERVAL`` seconds, so clients and proxies in between do not time out and users
see progress. SSE clients ignore comment lines. Once the model is ready the backend's events
follow in the same response; an error becomes a last ``data: {"error": …}`` event
(``GatewayRequest.send_error``).
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from llamaproxy.gateway.request import GatewayRequest

#: Seconds between two ``: loading`` comments.
LOADING_COMMENT_INTERVAL = 5.0


class LoadingComments:
    """Writes the ``: loading`` comments of one request until ``stop``."""

    def __init__(self, request: GatewayRequest, name: str, clock: IReactorTime,
                 interval: float = LOADING_COMMENT_INTERVAL) -> None:
        self.request = request
        self.name = name
        self.clock = clock
        self.interval = interval
        self.since = clock.seconds()
        self._call: IDelayedCall | None = None

    def start(self) -> None:
        """Send the head (200, text/event-stream) and the first comment."""
        request = self.request
        request.loading_stream = True
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")
        self._comment()

    def stop(self) -> None:
        """No more comments (the model is ready, or the wait ended)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _comment(self) -> None:
        self._call = None
        request = self.request
        if request.gone or request.finished:
            return
        seconds = int(self.clock.seconds() - self.since)
        request.write(f": loading {self.name} {seconds}s\n\n".encode())
        self._call = self.clock.callLater(self.interval, self._comment)
