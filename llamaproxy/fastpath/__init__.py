"""The fast paths: everything that reaches into Twisted's private internals for speed, in one
package, behind one switch.

``FAST_PATHS=auto`` (the default) turns them on only when the startup contract check
(``llamaproxy.fastpath.contract``) passes against the installed Twisted and Python: the Twisted
version is inside the tested range, the reactor is the epoll reactor, every private name the fast
paths use exists with the expected kind, and every Twisted function they replace has the source
they were written against. Otherwise one warning says which check failed and the gateway runs the
stock Twisted path. ``FAST_PATHS=off`` always runs stock. The stock path is the reference
behaviour; the scenario tests run both ways.

=================  ==============================================  ============================
fast path          replaces (stock path)                          measured gain (performance.md)
=================  ==============================================  ============================
``lean_poll``      ``EPollReactor.doPoll``'s per-socket log        ~6 % of the CPU at 500
                   context                                         streams
``eager_write``    a TCP transport's buffered ``write``: sent when  ~1/6 of the CPU at 500
                   the read callback returns, not the next turn    streams
``stream_lane``    the layers between a backend read and a client  per event 8.9 -> 5.3 µs
                   write, for the usual piece of a stream
``backend_client`` ``twisted.web.client.Agent`` +                  the largest per-request
                   ``HTTPConnectionPool``; a plain TCP endpoint's  saving of the speed work
                   wrapper per new connection
``gc_schedule``    CPython's collector thresholds (and             10-30 ms pauses under 500
                   ``gc.freeze``)                                  streams
``header_fill``    ``Headers.addRawHeader`` per request header     774 000 -> 759 200
                   line (its name encoding call and sanitizing);   instructions per request;
                   ``setHeader`` for the gateway's own response    827 400 -> 805 500
                   headers                                         (performance.md)
``first_write``    ``server.Request.write``'s two header lookups   801 200 -> 792 800
                   before a response's first write, and            (performance.md)
                   ``http.Request.write``'s one; ``finish``'s
                   call of the gateway site's no-op ``log``
``request_start``  twisted.web's Request constructor (three        ~8 300 instructions per
                   calls) and ``requestReceived``'s Content-Type   request (performance.md)
                   lookup
=================  ==============================================  ============================

``header_fill``, ``first_write`` and ``request_start`` are not listed in ``ALL`` (nor in /health
and the metrics, which name those): they run whenever the others do
(``GatewaySite(fast_headers=...)``, set by the tap from this switch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from llamaproxy.fastpath.contract import check

log = Logger()

#: Every fast path, in the order they are reported.
ALL = ("lean_poll", "eager_write", "stream_lane", "backend_client", "gc_schedule")

#: FAST_PATHS values.
MODES = ("auto", "off")


@dataclass(frozen=True)
class FastPaths:
    """Which fast paths this process runs, and why the others are off."""

    mode: str = "off"
    active: tuple[str, ...] = ()
    #: Why they are off in ``auto`` mode (the failed checks), or None.
    failed_checks: tuple[str, ...] = field(default=())

    def __contains__(self, name: str) -> bool:
        return name in self.active

    def document(self) -> dict[str, object]:
        """What /health says about them."""
        doc: dict[str, object] = {"mode": self.mode, "active": list(self.active)}
        if self.failed_checks:
            doc["failed_checks"] = list(self.failed_checks)
        return doc


def select(mode: str, reactor: Any) -> FastPaths:
    """The fast paths to run for FAST_PATHS=``mode`` on ``reactor``; one warning when ``auto``
    falls back to the stock path."""
    if mode == "off":
        log.info("Fast paths off (FAST_PATHS=off): the stock Twisted path runs")
        return FastPaths("off")
    failures = tuple(check(reactor))
    if failures:
        log.warn(
            "Fast paths off: the installed Twisted does not have the shape they assume "
            "({failures}); running the stock Twisted path",
            failures="; ".join(failures),
        )
        return FastPaths(mode, (), failures)
    return FastPaths(mode, ALL)
