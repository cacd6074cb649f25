"""The backend's own metrics: scrape llama-server's ``/metrics`` and re-export its families.

``BackendMetricsScraper`` fetches ``/metrics`` (the child needs ``--metrics``) every ``interval``
seconds with the backend key and keeps the last good result; ``relabel_backend_metrics`` turns
the text into ``llamacpp:*`` families with an added ``model`` label, which ``GatewayMetrics``
re-emits in the same scrape as the gateway's own series.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from llamaproxy.backends.backend import Backend
from llamaproxy.supervision.probe import HTTPAgent, read_body_bounded

log = Logger()

_LEGAL_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LEGAL_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def relabel_backend_metrics(text: str, model: str) -> list[Metric]:
    """llama-server's ``/metrics`` text → its ``llamacpp:*`` families with ``model`` added.

    Names are kept as the backend wrote them. prometheus-client's parser renames a counter
    sample that lacks ``_total`` (llama-server's ``llamacpp:n_busy_slots_per_decode`` is one,
    and is really an average); such a family is re-emitted untyped under its own name.
    Families with names or labels outside the classic character set are dropped.
    Raises ``ValueError`` when the text does not parse.
    """
    raw_names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            raw_names.add(line.split("{", 1)[0].split(None, 1)[0])
    families: list[Metric] = []
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("llamacpp:") or not _LEGAL_NAME.match(family.name):
            continue
        kind = family.type
        bare = kind == "counter" and family.name in raw_names
        if bare:
            kind = "unknown"
        out = Metric(family.name, family.documentation, kind, family.unit)
        legal = True
        for sample in family.samples:
            if not all(_LEGAL_LABEL.match(label) for label in sample.labels):
                legal = False
                break
            name = family.name if bare and sample.name == family.name + "_total" else sample.name
            out.add_sample(name, {**sample.labels, "model": model}, sample.value)
        if legal:
            families.append(out)
    return families


class BackendMetricsScraper(Service):
    """Fetches a backend's ``/metrics`` every ``interval`` seconds and keeps the last good result.

    Sends the backend key (``Authorization: Bearer``), gives up after ``timeout`` seconds, skips
    a backend that is not ready, and never stops on an error: a failed scrape keeps the previous
    families (``up`` says whether the last one worked). llama-server answers 501 without
    ``--metrics``.
    """

    def __init__(
        self,
        backend: Backend,
        agent: HTTPAgent,
        clock: IReactorTime,
        interval: float = 15.0,
        timeout: float = 5.0,
        body_limit: int = 1 << 20,
    ) -> None:
        self.backend = backend
        self._agent = agent
        self._clock = clock
        self.interval = interval
        self.timeout = timeout
        self.body_limit = body_limit
        #: The last good scrape, relabelled; empty until the first success.
        self.families: list[Metric] = []
        #: Clock time of the last good scrape.
        self.last_success: float | None = None
        #: True when the last scrape attempt succeeded.
        self.up = False
        self.last_error: str | None = None
        self._loop: LoopingCall | None = None
        self._in_flight: Deferred[None] | None = None

    def startService(self) -> None:
        """Scrape now, then every ``interval`` seconds, and whenever the backend becomes ready."""
        Service.startService(self)
        loop = self._loop = LoopingCall(self.scrape_once)
        loop.clock = self._clock
        loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("Backend metrics loop stopped", f))
        if self._on_state not in self.backend.listeners:
            self.backend.listeners.append(self._on_state)

    def _on_state(self, backend: Backend) -> None:
        # A (re)started backend has fresh counters: fetch them now, not up to `interval` later.
        if backend.ready and self.running:
            self.scrape_once()

    def stopService(self) -> Deferred[None]:
        """Stop the loop and cancel a scrape in flight."""
        Service.stopService(self)
        if self._on_state in self.backend.listeners:
            self.backend.listeners.remove(self._on_state)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._in_flight is not None:
            self._in_flight.cancel()
        return succeed(None)

    def scrape_once(self) -> Deferred[None]:
        """One scrape; the Deferred always succeeds (errors are recorded and logged)."""
        if self._in_flight is not None:
            return self._in_flight
        if not self.backend.ready:
            return succeed(None)
        attempt: Deferred[bytes] = Deferred.fromCoroutine(self._fetch())
        attempt.addTimeout(self.timeout, self._clock)
        done: Deferred[None] = attempt.addCallbacks(self._succeeded, self._failed)
        if not done.called:
            self._in_flight = done
            done.addBoth(self._clear)
        return done

    def _clear(self, result: None) -> None:
        self._in_flight = None
        return result

    async def _fetch(self) -> bytes:
        url = (self.backend.base_url.rstrip("/") + "/metrics").encode("ascii")
        headers = Headers({b"User-Agent": [b"llamaproxy-metrics"], b"Accept": [b"text/plain"]})
        if self.backend.api_key:
            headers.setRawHeaders(b"Authorization",
                                  [b"Bearer " + self.backend.api_key.encode("ascii")])
        response = await self._agent.request(b"GET", url, headers)
        code = int(response.code)
        if code != 200:
            await _discard_body(response)
            if code == 501:
                raise _ScrapeError("HTTP 501: llama-server was started without --metrics")
            raise _ScrapeError(f"HTTP {code}")
        body = await read_body_bounded(response, self.body_limit + 1)
        if len(body) > self.body_limit:
            raise _ScrapeError(f"body larger than {self.body_limit} bytes")
        return body

    def _succeeded(self, body: bytes) -> None:
        try:
            families = relabel_backend_metrics(body.decode("utf-8"), self.backend.model)
        except Exception as e:  # a bad document must not stop the loop
            self._record_failure(f"unparsable metrics: {type(e).__name__}: {e}"[:200])
            return
        self.families = families
        self.last_success = self._clock.seconds()
        if not self.up and self.last_error is not None:
            log.info("Backend {backend} metrics scrape works again", backend=self.backend.name)
        self.up = True
        self.last_error = None

    def _failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) and not self.running:
            return
        if failure.check(TimeoutError):
            detail = f"timed out after {self.timeout:g}s"
        elif failure.check(_ScrapeError):
            detail = str(failure.value)
        else:
            detail = f"{type(failure.value).__name__}: {failure.getErrorMessage()}"[:200]
        self._record_failure(detail)

    def _record_failure(self, detail: str) -> None:
        if self.up or self.last_error is None:  # log transitions, not every interval
            log.warn("Backend {backend} metrics scrape failed: {detail}; keeping the last "
                     "good result", backend=self.backend.name, detail=detail)
        self.up = False
        self.last_error = detail


class _ScrapeError(Exception):
    """A scrape answered, but not with usable metrics."""


async def _discard_body(response: Any) -> None:
    with contextlib.suppress(Exception):  # only draining; the status already decided
        await read_body_bounded(response, 4096)
