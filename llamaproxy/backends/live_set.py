"""The live set of backends: their services (supervised children, monitors of remote upstreams),
status records and queues, updated in place when the backends file is reloaded.

``BackendSet.apply(table)`` makes the live objects of a backends table and returns its Router;
a local backend with ``start = "on_demand"`` gets an ``OnDemandModel`` (in its ``SwapGroup``)
that starts its supervisor when a request asks for it;
``reload`` re-reads the file off the reactor thread and applies it (SIGHUP). The composition root
(``llamaproxy.tap``) builds one and wires its reload to SIGHUP.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any, cast

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from llamaproxy.backends.admission import Admission
from llamaproxy.backends.backend import Backend, BackendState
from llamaproxy.backends.config_file import (
    BackendSpec,
    BackendsTable,
    LocalBackendSpec,
    LocalDefaults,
    RemoteBackendSpec,
    diff,
    load_backends_file,
    needs_restart,
)
from llamaproxy.backends.on_demand import ModelEvents, OnDemandModel
from llamaproxy.backends.routing import Router, status_for
from llamaproxy.backends.swap_group import SwapGroup
from llamaproxy.config import Config, ConfigError
from llamaproxy.off_thread import OffThread
from llamaproxy.supervision.probe import ExternalBackendMonitor
from llamaproxy.supervision.supervisor import LlamaServerSupervisor

log = Logger()

#: Probe interval of an on-demand child while it starts (requests wait for it): 0.1 s rather
#: than the supervisor's 0.5 s, which would be most of a small model's cold start.
ON_DEMAND_PROBE_INTERVAL = 0.1


class BackendSet(MultiService):
    """The backends' own services (supervised children, monitors of remote upstreams).

    ``apply(table)`` makes the live objects of a backends table and returns its Router; applied
    again after a reload, it starts added backends, stops removed ones (their requests in flight
    finish: a removed child is stopped only after the drain of its own streams would allow), and
    restarts changed ones. Backends that did not change keep their process, status and queue.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        agent: Any,
        llama_server: str | None = None,
        backends_file: str | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        #: The llama-server binary local children run (None: no local backend).
        self.llama_server = llama_server
        #: The backends file (None: the one backend of MODEL_PATH or BACKEND_URL).
        self.backends_file = backends_file
        self.reactor = reactor
        self.agent = agent
        self.table: BackendsTable | None = None
        self.router: Router | None = None
        self.statuses: dict[str, Backend] = {}
        self.loads: dict[str, Admission] = {}
        self.by_name: dict[str, Service] = {}
        #: The on-demand backends' lifecycles, by backend name.
        self.models: dict[str, OnDemandModel] = {}
        #: The ``[[groups]]``, by name.
        self.groups: dict[str, SwapGroup] = {}
        #: Told of every on-demand model's loads, unloads and swaps (``add_model_events``).
        self.model_events: list[ModelEvents] = []
        #: Called with (name, base_url, admission, slots) for each new backend queue: how
        #: replicas lease a shared backend's slots from Redis (STATE_URL).
        self.on_admission: Callable[[str, str, Admission, int], object] | None = None
        #: Called with (name, admission) once a removed or replaced backend's queue is idle.
        self.on_retired: Callable[[str, Admission], object] | None = None

    def apply(self, table: BackendsTable) -> Router:
        """Make (or update) the live backends for ``table``; returns the new Router."""
        added: frozenset[str] | set[str]
        removed: frozenset[str] | set[str] = set()
        changed: frozenset[str] | set[str] = set()
        if self.table is None:
            added = {s.name for s in table.backends}
        else:
            added, removed, changed = diff(self.table, table)
        self._apply_groups(table)
        for name in removed:
            self._retire(*self._detach(name))
        for spec in table.backends:
            if spec.name in added:
                self._add(spec)
            elif spec.name in changed and self._update_on_demand(spec):
                pass  # idle_ttl or group changed: applied to the running model
            elif spec.name in changed:
                # The new child may need the old one's port: start it once the old one is gone.
                # Meanwhile requests for it wait (its new status says "starting").
                old = self._detach(spec.name)
                self._prepare(spec).set_state(BackendState.STARTING)
                self._retire(*old, then=functools.partial(self._start, spec))
        self.router = Router.build(table, self.reactor, self.statuses, self.loads, self.router)
        self.table = table
        return self.router

    def add_model_events(self, events: ModelEvents) -> None:
        """Tell ``events`` of the loads, unloads and swaps of every on-demand model, present
        and future (the metrics)."""
        self.model_events.append(events)
        for model in self.models.values():
            model.events.append(events)
        for group in self.groups.values():
            group.events.append(events)

    def reload(self, off_thread: OffThread) -> Deferred[Router | None]:
        """SIGHUP: re-read the backends file (read and checked by ``off_thread``) and apply it;
        the new Router, or None when the file does not load (the current one is kept)."""
        assert self.backends_file is not None
        path, defaults = self.backends_file, LocalDefaults.from_config(self.config)

        def read() -> BackendsTable:
            table = load_backends_file(path, os.environ, defaults=defaults)
            check_remote_tls(table)
            return table

        def apply(table: BackendsTable) -> Router:
            router = self.apply(table)
            log.info("Backends file reloaded: {count} backends", count=len(table.backends))
            return router

        def refused(failure: Failure) -> None:
            failure.trap(ConfigError)
            log.error("Backends file not reloaded, keeping the current one: {error}",
                      error=failure.getErrorMessage())

        return off_thread(read).addCallbacks(apply, refused)

    def _apply_groups(self, table: BackendsTable) -> None:
        """Make the new ``[[groups]]`` and update the settings of the others."""
        for spec in table.groups:
            group = self.groups.get(spec.name)
            if group is None:
                group = self.groups[spec.name] = SwapGroup(spec, self.reactor)
                group.events.extend(self.model_events)
            elif group.spec != spec:
                group.update(spec)
        for name in list(self.groups):
            if all(spec.name != name for spec in table.groups):
                del self.groups[name]  # its members are removed or moved by this reload

    def _update_on_demand(self, spec: BackendSpec) -> bool:
        """A changed on-demand backend whose process settings did not change: update its
        lifecycle in place (True), keeping its child, status and queue."""
        model = self.models.get(spec.name)
        old = self.table.backend(spec.name) if self.table is not None else None
        if model is None or not isinstance(spec, LocalBackendSpec) or not spec.on_demand \
                or old is None or needs_restart(old, spec):
            return False
        model.set_idle_ttl(spec.idle_ttl)
        self.loads[spec.name].set_capacity(spec.max_concurrent)
        group = self.groups.get(spec.group) if spec.group is not None else None
        if group is not model.group:
            if model.group is not None:
                model.group.remove(model)
            model.group = group
            if group is not None:
                group.add(model)
        return True

    def _prepare(self, spec: BackendSpec) -> Backend:
        """The status record and queue a backend is routed with."""
        status = status_for(spec)
        self.statuses[spec.name] = status
        admission = self.loads[spec.name] = Admission(
            spec.max_concurrent, self.config.max_queue_size, self.config.max_queue_per_key,
            clock=self.reactor,
        )
        if self.on_admission is not None:
            self.on_admission(spec.name, spec.base_url, admission, spec.max_concurrent)
        return status

    def _add(self, spec: BackendSpec) -> None:
        self._prepare(spec)
        self._start(spec)

    def _start(self, spec: BackendSpec) -> None:
        config, status = self.config, self.statuses[spec.name]
        if isinstance(spec, LocalBackendSpec):
            # Without a backends file the one child keeps today's names (its key file is
            # backend-INSTANCE_ID.key); with one, each child's instance id gets its name.
            child = config if self.backends_file is None else spec.child_config(config)
            service: Service = supervisor_for(
                child, self.llama_server, status, self.reactor, self.agent, spec.child_env)
            if spec.on_demand:
                # A request waits for this start: probe often, so it learns of "ready" at once.
                supervisor = cast(LlamaServerSupervisor, service)
                supervisor.timings = dataclasses.replace(
                    supervisor.timings, startup_probe_interval=ON_DEMAND_PROBE_INTERVAL)
                group = self.groups.get(spec.group) if spec.group is not None else None
                model = OnDemandModel(
                    status, service, self.loads[spec.name], self.reactor, spec.idle_ttl, group,
                    backoff_max=config.backoff_max,
                    preload=group is not None and spec.name in group.spec.preload,
                )
                model.events.extend(self.model_events)
                self.models[spec.name] = model
                service = model
        else:
            service = ExternalBackendMonitor(
                status, self.agent, self.reactor, config.probe_interval, config.health_timeout,
                no_health_is_ready=self.backends_file is not None,
            )
        self.by_name[spec.name] = service
        service.setServiceParent(self)

    def _detach(self, name: str) -> tuple[str, Service | None, Admission | None]:
        """Take a backend out of the set (the next Router will not route to it)."""
        self.statuses.pop(name, None)
        self.models.pop(name, None)
        return name, self.by_name.pop(name, None), self.loads.pop(name, None)

    def _retire(
        self,
        name: str,
        service: Service | None,
        load: Admission | None,
        then: Callable[[], object] | None = None,
    ) -> None:
        """Stop a detached backend's service once its requests finished (up to DRAIN_TIMEOUT)."""
        deadline = self.reactor.seconds() + self.config.drain_timeout

        def stop() -> None:
            busy = load is not None and (load.active or load.waiting)
            if busy and self.reactor.seconds() < deadline:
                self.reactor.callLater(0.2, stop)
                return
            if load is not None and self.on_retired is not None:
                self.on_retired(name, load)
            if service is None:
                stopped: Deferred[None] = Deferred()
                stopped.callback(None)
            else:
                log.info("Backend {name} removed: stopping it", name=name)
                result = service.disownServiceParent()
                stopped = result if isinstance(result, Deferred) else Deferred()
                if not isinstance(result, Deferred):
                    stopped.callback(None)
            stopped.addErrback(lambda f: log.failure("Error stopping {name}", f, name=name))
            if then is not None:
                stopped.addCallback(lambda _: then())

        stop()


def supervisor_for(
    config: Config, llama_server: str | None, backend: Backend, reactor: Any, agent: Any,
    child_env: tuple[tuple[str, str], ...] = (),
) -> Service:
    """The supervisor of one local llama-server child (its key file, arguments, environment)."""
    from llamaproxy.supervision.llama_server import (
        BackendKeyFile,
        build_args,
        child_environment,
        spawn_command,
    )
    from llamaproxy.supervision.supervisor import LlamaServerSupervisor, SupervisorTimings

    if llama_server is None:
        raise ConfigError("a local backend needs the llama-server binary")
    key_file = BackendKeyFile(config.key_dir, config.instance_id)
    backend.api_key = key_file.key
    return LlamaServerSupervisor(
        backend=backend,
        executable=llama_server,
        args=build_args(config, key_file.path),
        env=child_environment(os.environ, child_env),
        key_file=key_file,
        reactor=reactor,
        agent=agent,
        timings=SupervisorTimings.from_config(config),
        launcher=spawn_command,
        request_log_level=LogLevel.levelWithName(config.child_request_log_level),
    )


def check_remote_tls(table: BackendsTable) -> None:
    """Refuse a remote backend that asks not to verify its certificate (never supported)."""
    for spec in table.backends:
        if isinstance(spec, RemoteBackendSpec) and not spec.verify_tls:
            raise ConfigError(
                f"backend {spec.name!r}: verify_tls = false is not supported; "
                "upstream certificates are always verified"
            )
