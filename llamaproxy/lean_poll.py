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
"""

from __future__ import annotations

import errno
import sys
from select import EPOLLIN
from typing import Any

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
                        if selectable.fileno() == -1:
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


def _prefix(selectable: Any) -> str:
    try:
        return str(selectable.logPrefix())
    except Exception:
        return "(buggy logPrefix method)"
