"""Relaying a backend response body to the client, chunk by chunk, with backpressure.

``StreamRelay`` is both the protocol the backend body is delivered to and the push producer
registered on the client's request: when the client's socket buffer fills, twisted.web pauses
us and we pause the backend connection, so a slow client slows the backend read instead of
growing the gateway's memory. When the client goes away, ``stopProducing`` closes the backend
connection, which makes llama-server stop generating. A backend that breaks mid-body makes us
abort the client connection: a truncated response must never look complete. Once the response
head is out, the usual piece of a stream (one whole chunk of whole events) skips all of this
through the relay's fast lane (``llamaproxy.fastpath.stream_lane``), which the relay opens and
closes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from zope.interface import implementer

from llamaproxy.fastpath.stream_lane import StreamLane
from llamaproxy.gateway.request import GatewayRequest
from llamaproxy.gateway.tokens import UsageCollector

log = Logger()

# The default reason for connectionLost: a body that ended cleanly.
_DONE = Failure(ResponseDone())
#: How a body that was relayed whole ends (PotentialDataLoss: a read-until-close body).
_ENDED_WHOLE = (ResponseDone, PotentialDataLoss)


@implementer(IPushProducer)
class StreamRelay(Protocol):
    """Backend body → client request; ``done`` fires with how the relay ended (and
    ``on_end``, if set, is called then)."""

    #: How the relay ended: "complete", "client_gone", "backend_failed" or "idle_timeout".
    outcome: str | None = None
    #: Called (without arguments) when the relay ended, after ``done`` fired: the proxied
    #: exchange's end, without a Deferred between.
    on_end: Callable[[], object] | None = None

    def __init__(
        self,
        request: GatewayRequest,
        clock: IReactorTime,
        idle_timeout: float,
        usage: UsageCollector | None = None,
        watched: bool = False,
    ) -> None:
        self.request = request
        #: (An instance attribute, not only the class default: read twice per piece, and a
        #: class attribute read through the instance is the interpreter's slow path.)
        self.outcome = None
        self.usage = usage
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.bytes_sent = 0
        #: ``done``, once asked for; True once the relay ended (``_ended``).
        self._done: Deferred[str] | None = None
        self._over = False
        self._paused = False
        self._idle_call: IDelayedCall | None = None
        self._registered = False
        self._last_data = clock.seconds()
        #: The fast lane while it is open (see llamaproxy.fastpath.stream_lane); whether to
        #: try one (until StreamLane.possible says this relay never can).
        self._lane: StreamLane | None = None
        self._try_lane = True
        #: True when the exchange's one timer checks for idleness (``watch``): the relay arms
        #: no timer of its own.
        self._watched = watched

    @property
    def done(self) -> Deferred[str]:
        """A Deferred firing with ``outcome`` once the relay ended (made when first asked for:
        the proxy uses ``on_end``)."""
        if self._done is None:
            self._done = Deferred()
            if self._over:
                self._done.callback(cast(str, self.outcome))
        return self._done

    # -- backend side (IProtocol) ----------------------------------------------------------

    def connectionMade(self) -> None:
        if self.request.gone:
            self._end("client_gone")
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self.request.registerProducer(self, True)
        self._registered = True
        self._arm_idle_timer()

    def dataReceived(self, data: bytes) -> None:
        request = self.request
        if self.outcome is not None or request.lost or request.finished:
            return  # (request.gone, inline: this runs once per event of every stream)
        if self.usage is not None:
            self.usage.feed(data)
        self.bytes_sent += len(data)
        # One write per backend read (the backend connection joins a read's chunks): it can
        # leave at once instead of when the read callback returns.
        request.write_piece(data)
        # The idle timer is not reset per piece (that is most of a relay's timer work); it
        # checks this when it fires.
        self._last_data = self.clock.seconds()
        if (self._lane is None and self._try_lane and request.startedWriting
                and not self._paused and self.outcome is None):
            # The head is out now: the usual pieces can take the fast lane, if this relay can
            # ever have one (asked once: a whole body, for one, never can).
            self._try_lane = StreamLane.possible(self, self.clock)
            if self._try_lane:
                self._lane = StreamLane.open(self, self.clock)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self._close_lane()
        self._cancel_idle_timer()
        if self.outcome is not None:
            self._unregister()
            return
        if self.request.gone:
            self._end("client_gone")
            return
        # isinstance, not Failure.check: check() computes the class's qualified MRO names.
        if isinstance(reason.value, _ENDED_WHOLE):
            if self.usage is not None:
                self.usage.finish()
            self._unregister()
            self.outcome = "complete"  # before finish(): the access log reads it
            self.request.finish()
            self._ended()
            return
        log.warn(
            "Backend response broke after {bytes} bytes: {reason}; aborting the client",
            bytes=self.bytes_sent,
            reason=reason.getErrorMessage(),
        )
        self._unregister()
        self.request.abort()
        self._end("backend_failed")

    # -- client side (IPushProducer) -------------------------------------------------------

    def pauseProducing(self) -> None:
        self._close_lane()  # (it reopens with the next piece after resumeProducing)
        self._paused = True
        self._cancel_idle_timer()
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self._paused = False
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        self._arm_idle_timer()

    def stopProducing(self) -> None:
        """The client went away: close the backend connection so generation stops."""
        if self.outcome is not None:
            return
        self._cancel_idle_timer()
        self._end("client_gone")
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    # -- stopping from our side -------------------------------------------------------------

    def abort(self, outcome: str) -> None:
        """Stop relaying because of a gateway decision (timeout, shutdown): cut both sides."""
        if self.outcome is not None:
            return
        self._cancel_idle_timer()
        self._end(outcome)
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]
        self._unregister()
        self.request.abort()

    # -- internals ---------------------------------------------------------------------------

    def _arm_idle_timer(self) -> None:
        if self._paused or self.outcome is not None or self.idle_timeout <= 0:
            return
        self._last_data = self.clock.seconds()
        if self._watched:
            return  # (the exchange's timer calls watch)
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.idle_timeout)
        else:
            self._idle_call = self.clock.callLater(self.idle_timeout, self._idle_expired)

    def _cancel_idle_timer(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def watch(self) -> float | None:
        """For a watched relay, the exchange's timer: abort the relay if it has been idle for
        the idle timeout; else the seconds until it could be (None: nothing left to watch)."""
        if self.outcome is not None or self.idle_timeout <= 0:
            return None
        if self._paused:
            return self.idle_timeout  # a paused relay is not idle (resuming restarts the wait)
        left = self._idle_left()
        if left is not None:
            return left
        self._abort_idle()
        return None

    def _idle_left(self) -> float | None:
        """Seconds of the idle timeout left since the last data, or None when it has passed."""
        last = self._last_data
        if self._lane is not None and self._lane.last_piece_at > last:
            last = self._lane.last_piece_at
        left = self.idle_timeout - (self.clock.seconds() - last)
        return left if left > 0.001 else None

    def _idle_expired(self) -> None:
        left = self._idle_left()
        if left is not None:
            # Data came since the timer was armed: wait out the rest of the timeout.
            self._idle_call = self.clock.callLater(left, self._idle_expired)
            return
        self._idle_call = None
        self._abort_idle()

    def _abort_idle(self) -> None:
        self._close_lane()  # (its count first: the message says how much was sent)
        log.warn(
            "Backend sent nothing for {seconds}s after {bytes} bytes; aborting",
            seconds=self.idle_timeout,
            bytes=self.bytes_sent,
        )
        self.abort("idle_timeout")

    def _unregister(self) -> None:
        if not self._registered:
            return
        self._registered = False
        if self.request.channel is not None:
            self.request.unregisterProducer()

    def _close_lane(self) -> None:
        lane, self._lane = self._lane, None
        if lane is not None:
            if lane.last_piece_at > self._last_data:
                self._last_data = lane.last_piece_at
            lane.close()

    def _end(self, outcome: str) -> None:
        self._close_lane()
        if self.outcome is None:
            self.outcome = outcome
            self._ended()

    def _ended(self) -> None:
        """Tell that the relay ended (``outcome`` is set): ``done``, then ``on_end``."""
        self._over = True
        if self._done is not None:
            self._done.callback(cast(str, self.outcome))
        on_end, self.on_end = self.on_end, None  # (once; and no cycle through it is left)
        if on_end is not None:
            on_end()
