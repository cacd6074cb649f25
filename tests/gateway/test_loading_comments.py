"""``: loading`` comments of one streaming request (``gateway.loading_comments``)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.gateway.loading_comments import LoadingComments


class FakeRequest:
    """What LoadingComments touches of a GatewayRequest."""

    def __init__(self) -> None:
        self.loading_stream = False
        self.code = 0
        self.headers: dict[bytes, bytes] = {}
        self.written: list[bytes] = []
        self.gone = False
        self.finished = False

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value

    def write(self, data: bytes) -> None:
        self.written.append(data)


class LoadingCommentsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.request = FakeRequest()
        self.comments = LoadingComments(self.request, "qwen", self.clock,  # type: ignore[arg-type]
                                        interval=5)

    def test_head_then_a_comment_per_interval_until_stopped(self) -> None:
        self.comments.start()
        self.assertTrue(self.request.loading_stream)
        self.assertEqual(self.request.code, 200)
        self.assertEqual(self.request.headers[b"Content-Type"], b"text/event-stream")
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual(self.request.written,
                         [b": loading qwen 0s\n\n", b": loading qwen 5s\n\n",
                          b": loading qwen 10s\n\n"])
        self.comments.stop()
        self.clock.advance(60)
        self.assertEqual(len(self.request.written), 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_client_gone_gets_no_more_comments(self) -> None:
        self.comments.start()
        self.request.gone = True
        self.clock.advance(5)
        self.assertEqual(self.request.written, [b": loading qwen 0s\n\n"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
