"""The operator page as a service: its listener, its sampler and its child-log observer.

:func:`operator_page` wires the page to the live gateway objects (``tap.makeService`` calls it
when ``ADMIN_LISTEN`` is set); :class:`OperatorPageService` starts the sampler and the log
observer with the listener and stops them with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import ILogObserver, LogPublisher
from twisted.web.server import Site

from llamaproxy.admin.activity import ActivityRing
from llamaproxy.admin.childlog import ChildLogTail
from llamaproxy.admin.operations import BackendOperations
from llamaproxy.admin.resource import AdminResource, LiveUpdates
from llamaproxy.admin.series import Sampler
from llamaproxy.admin.sessions import SessionStore
from llamaproxy.admin.view import Dashboard
from llamaproxy.auth.keys import KeySet
from llamaproxy.gateway.recorder import RequestRecorder
from llamaproxy.observability.metrics import GatewayMetrics


class OperatorPageService(MultiService):
    """Runs the page's listener, sampler and child-log observer together."""

    def __init__(
        self,
        listener: IService,
        sampler: Sampler,
        live: LiveUpdates,
        log_publisher: LogPublisher,
        child_logs: ILogObserver,
    ) -> None:
        super().__init__()
        self.sampler = sampler
        self.live = live
        self.log_publisher = log_publisher
        self.child_logs = child_logs
        listener.setServiceParent(self)

    def startService(self) -> None:
        self.log_publisher.addObserver(self.child_logs)
        self.sampler.start()
        super().startService()

    def stopService(self) -> Deferred[None]:
        self.live.close_all()
        self.sampler.stop()
        self.log_publisher.removeObserver(self.child_logs)
        return maybeDeferred(super().stopService)


def operator_page(
    endpoint: str,
    reactor: Any,
    router: Callable[[], Any],
    services: Callable[[], Mapping[str, Any]],
    keys: Callable[[], KeySet],
    admin_key_ids: frozenset[str],
    session_ttl: float,
    metrics: GatewayMetrics,
    recorder: RequestRecorder,
    log_publisher: LogPublisher,
) -> OperatorPageService:
    """The operator page on ``endpoint``, reading the live gateway's objects."""
    activity = ActivityRing()
    recorder.observers.append(activity.observe)
    sampler = Sampler(metrics.totals, metrics.key_totals, reactor)
    child_logs = ChildLogTail()
    operations = BackendOperations(services)
    dashboard = Dashboard(router, activity, sampler, child_logs, operations, reactor)
    sessions = SessionStore(keys, admin_key_ids, reactor, session_ttl)
    live = LiveUpdates(dashboard, sessions, reactor)
    site = Site(AdminResource(dashboard, sessions, operations, reactor, live))
    site.log = lambda request: None  # type: ignore[method-assign]
    listener = strports.service(endpoint, site, reactor=reactor)
    return OperatorPageService(listener, sampler, live, log_publisher, child_logs)
