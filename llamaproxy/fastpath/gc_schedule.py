"""When the gateway's cyclic garbage collector runs: the young generation on allocation, the
rest on a timer.

CPython collects a generation when enough container objects were allocated since its last
collection. For a gateway that is the wrong clock for the older generations: under load, what
survives a young collection is mostly live streams' state (~110 objects each), which reference
counting frees when the stream ends. Collecting it anyway, on allocation, means pauses while
hundreds of streams are open: 10 ms for generation 1 and 20-30 ms for a full collection on the
benchmark's 500 streams, each seen by every open stream as one late event (the p99 gap between
events). The gateway makes almost no cyclic garbage (its request, exchange and relay cut their
links when done), so nothing is gained by chasing it.

``GcSchedule`` therefore, while it runs:

- moves everything built at start-up out of the collector's sight (``gc.freeze()``);
- collects the young generation every ``young_threshold`` net new objects (~2 ms pauses);
- never collects the older generations on allocation, but does a full collection every
  ``full_interval`` seconds instead (one pause of that size per interval, whatever the load);

and puts the collector's thresholds back, and unfreezes what it froze, when it stops.

Assumes nothing of Twisted; it is a fast path because it is a process-wide policy, on only
with the others (``FAST_PATHS``).
"""

from __future__ import annotations

import gc

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()

#: Net new container objects between young collections.
YOUNG_THRESHOLD = 5_000
#: Seconds between full collections.
FULL_INTERVAL = 60.0
#: Collections of a generation between collections of the next: far more than ever happen.
_NEVER = 1 << 30


class GcSchedule(Service):
    """The garbage collector's schedule while the gateway runs (see the module docstring)."""

    def __init__(
        self,
        clock: IReactorTime,
        full_interval: float = FULL_INTERVAL,
        young_threshold: int = YOUNG_THRESHOLD,
    ) -> None:
        self.clock = clock
        self.full_interval = full_interval
        self.young_threshold = young_threshold
        self.full_collections = 0
        self._saved: tuple[int, int, int] | None = None
        self._call: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()
        gc.freeze()
        self._saved = gc.get_threshold()
        gc.set_threshold(self.young_threshold, _NEVER, _NEVER)
        self._call = self.clock.callLater(self.full_interval, self._collect)

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None
            gc.unfreeze()  # what start-up froze is the collector's again

    def _collect(self) -> None:
        self._call = self.clock.callLater(self.full_interval, self._collect)
        found = gc.collect()
        self.full_collections += 1
        if found:
            log.debug("Full garbage collection: {found} unreachable objects", found=found)
