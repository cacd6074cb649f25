"""The epoll reactor's poll loop, without the legacy log context pushed per ready socket.

``EPollReactor.doPoll`` calls each socket epoll reports ready through
``twisted.python.log.callWithLogger``: it asks the socket for its log prefix, copies the legacy
log context with ``{"system": prefix}`` added, and pops it afterwards, six Python calls per
ready socket. Only legacy ``twisted.python.log.msg``/``err`` calls ever read that context; the
gateway logs with ``twisted.logger``, whose events do not. Under 500 streams (one ready socket per
SSE event) cProfile put about 6 % of the gateway's time in that bookkeeping.

``install(reactor)`` gives one ``EPollReactor`` instance (not the class) the same loop, calling
``_doReadOrWrite`` directly, with its read branch inlined for a socket that is just readable.
What changes: a legacy log line written by Twisted while it handles a socket says ``[-]``
instead of ``[HTTPChannel,3,127.0.0.1]``; an exception escaping the handler is still logged,
with that prefix as its system, as ``callWithLogger`` does. Any other reactor (or
an epoll reactor whose ``doPoll`` someone already replaced) is left alone.

**Read lanes.** ``add_read_lane(reactor, selectable, lane)`` makes the loop call
``lane.do_read()`` instead of ``selectable.doRead()`` when the selectable is just readable; the
return value means what ``doRead``'s does (None, or why the connection is over). A lane is how a
stream relay reads a backend socket and writes the client's without the layers in between
(``llamaproxy.fastpath.stream_lane``). It is keyed by file descriptor and checked against the
selectable registered for it, so a lane left behind can never read a connection that reused the
number. On a reactor without the lean loop, ``add_read_lane`` returns None and nothing changes.

Replaces: ``EPollReactor.doPoll`` on one reactor instance. Assumes: ``doPoll`` and
``_doReadOrWrite`` exactly as fingerprinted in ``llamaproxy.fastpath.contract``, the reactor's
``_selectables``/``_poller`` and ``posixbase._NO_FILEDESC``. Gain: ~6 % of the CPU at 500 streams,
and the read lanes the stream lane needs.
"""

from __future__ import annotations

import errno
import sys
from select import EPOLLIN
from typing import Any, Protocol

from twisted.internet.posixbase import _NO_FILEDESC
from twisted.python import log


def install(reactor: Any) -> bool:
    """Give ``reactor`` the lean poll loop; True when it was an EPollReactor that got it."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # pragma: no cover - not Linux
        return False
    if not isinstance(reactor, EPollReactor) or "doPoll" in vars(reactor):
        return False
    if type(reactor).doPoll is not EPollReactor.doPoll:
        return False  # a subclass with its own loop: keep it
    selectables = reactor._selectables
    handle = reactor._doReadOrWrite
    lanes: dict[int, tuple[Any, ReadLane]] = {}
    reactor.llamaproxy_read_lanes = lanes  # type: ignore[attr-defined]

    def do_poll(timeout: float | None) -> None:
        """``EPollReactor.doPoll`` minus ``callWithLogger``."""
        try:
            ready = reactor._poller.poll(-1 if timeout is None else timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        for fd, event in ready:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                if event == EPOLLIN:
                    # Just readable (most events): _doReadOrWrite's read branch, inlined.
                    in_read = False
                    why: object
                    try:
                        lane = lanes.get(fd)
                        if lane is not None and lane[0] is selectable:
                            why = lane[1].do_read()
                            in_read = True
                        elif selectable.fileno() == -1:
                            why = _NO_FILEDESC
                        else:
                            why = selectable.doRead()
                            in_read = True
                    except BaseException:
                        why = sys.exc_info()[1]
                        log.err()
                    if why:
                        reactor._disconnectSelectable(selectable, why, in_read)
                else:
                    handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.err(system=_prefix(selectable))

    reactor.doPoll = reactor.doIteration = do_poll  # type: ignore[method-assign]
    return True


class ReadLane(Protocol):
    """What ``add_read_lane`` takes: a replacement for one selectable's ``doRead``."""

    def do_read(self) -> object:
        """Read what is there and handle it; None, or why the connection is over."""


def add_read_lane(reactor: Any, selectable: Any, lane: ReadLane) -> int | None:
    """Read ``selectable`` through ``lane`` from now on; the file descriptor it is registered
    under (for ``remove_read_lane``), or None when the reactor has no lean loop or the
    selectable no file descriptor (then nothing changes)."""
    lanes = getattr(reactor, "llamaproxy_read_lanes", None)
    if lanes is None:
        return None
    fd = selectable.fileno()
    if fd < 0:
        return None
    lanes[fd] = (selectable, lane)
    return int(fd)


def has_read_lanes(reactor: Any) -> bool:
    """True when ``reactor`` has the lean loop, so ``add_read_lane`` can work."""
    return getattr(reactor, "llamaproxy_read_lanes", None) is not None


def remove_read_lane(reactor: Any, fd: int, lane: ReadLane) -> None:
    """Stop reading through ``lane`` (nothing if another lane, or none, is registered at fd)."""
    lanes = getattr(reactor, "llamaproxy_read_lanes", None)
    if lanes is not None:
        registered = lanes.get(fd)
        if registered is not None and registered[1] is lane:
            del lanes[fd]


def _prefix(selectable: Any) -> str:
    try:
        return str(selectable.logPrefix())
    except Exception:
        return "(buggy logPrefix method)"
