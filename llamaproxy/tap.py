"""`twistd llamaproxy`: command-line options and the composition root.

This is the only module that touches the global reactor (and only inside ``makeService``); every
other part takes its reactor, clock or agent as a parameter.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from typing import Any, cast

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.iweb import IAgent
from twisted.web.server import Site

from llamaproxy import __version__, fastpath
from llamaproxy.auth.access import AccessControl, TokenLimits
from llamaproxy.auth.ratelimit import RateLimiter
from llamaproxy.auth.store import KeyFileWatcher, KeyLoadError, KeyStore
from llamaproxy.auth.tokenlimit import TokenRateLimiter
from llamaproxy.backends import forward
from llamaproxy.backends.admission import Admission
from llamaproxy.backends.config_file import (
    LocalBackendSpec,
    LocalDefaults,
    load_backends_file,
    single_backend_table,
)
from llamaproxy.backends.live_set import BackendSet, check_remote_tls
from llamaproxy.backends.model_admin import ModelAdmin
from llamaproxy.config import SETTINGS, Config, ConfigError, load_config
from llamaproxy.fastpath import lean_poll
from llamaproxy.fastpath.eager_write import Cork
from llamaproxy.fastpath.gc_schedule import GcSchedule
from llamaproxy.gateway.body_budget import BodyBudget
from llamaproxy.gateway.client_address import TrustedProxies, parse_trusted_proxies
from llamaproxy.gateway.cors import CorsPolicy
from llamaproxy.gateway.proxy import GatewaySettings
from llamaproxy.gateway.recorder import RequestRecorder
from llamaproxy.gateway.resource import GatewayResource
from llamaproxy.gateway.site import GatewaySite, RequestLimits
from llamaproxy.observability.access_log import AccessLog, resolve_access_log
from llamaproxy.observability.health import HealthState, health_port_site
from llamaproxy.observability.logs import observer_for_twistd, parse_log_format
from llamaproxy.observability.loop_probe import LoopProbe
from llamaproxy.observability.metrics import GatewayMetrics, MetricsResource
from llamaproxy.observability.usage import UsageLedger, resolve_ledger_path
from llamaproxy.off_thread import OffThread
from llamaproxy.service import ConnectionPool, GatewayService
from llamaproxy.stop_signals import StopSignals
from llamaproxy.supervision.child_metrics import BackendMetricsScraper
from llamaproxy.tls import (
    CertificateWatcher,
    ReloadingContextFactory,
    TLSConfigError,
    TLSSettings,
    hsts_header,
    tls_server_endpoint,
)

log = Logger()



class Options(usage.Options):
    """Options of `twistd llamaproxy`; each also has an environment variable (see --help)."""

    synopsis = "[options]"
    longdesc = (
        "Run llamaproxy: an OpenAI-compatible gateway that supervises llama.cpp's llama-server "
        "(or proxies to a running one with --backend-url). Every option can also be set by the "
        "environment variable shown in brackets; a flag wins over its variable. "
        "See docs/configuration.md."
    )
    optParameters: list[list[Any]] = [
        [s.flag, None, None, f"{s.help} [{', '.join(s.env)}]"
         + (f" (default: {s.default})" if s.default not in (None, "") else "")]
        for s in SETTINGS
        if not s.repeatable
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self.config: Config | None = None
        #: The llama-server binary, when some backend is a local child (found in postOptions).
        self.llama_server_path: str | None = None

    def opt_listen(self, endpoint: str) -> None:
        """Gateway endpoint string (repeatable), e.g. tcp:8000,
        ssl:8443:privateKey=k.pem:certKey=c.pem,
        unix:/run/llamaproxy.sock. Overrides --port/--host. [LISTEN]"""
        self["listen"].append(endpoint)

    def opt_version(self) -> None:
        """Print llamaproxy's version and exit."""
        print(f"llamaproxy {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        flags = {s.name: self.get(s.flag) for s in SETTINGS if not s.repeatable}
        flags["listen"] = self["listen"]
        try:
            self.config = load_config(flags, os.environ)
            self.backends_file = self.config.backends_file
            if self.backends_file is not None:
                self.backends_table = load_backends_file(
                    self.backends_file, os.environ,
                    defaults=LocalDefaults.from_config(self.config),
                )
                check_remote_tls(self.backends_table)
            else:
                self.backends_table = single_backend_table(self.config)
            if any(isinstance(b, LocalBackendSpec) for b in self.backends_table.backends):
                from llamaproxy.supervision.llama_server import find_llama_server

                self.llama_server_path = find_llama_server(self.config.llama_server, os.environ)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options, reactor: Any = None) -> IService:
    """Build the whole service tree from parsed options."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config = options.config
    assert config is not None, "Options.postOptions did not run"
    worker = config.worker_type or None
    observer = observer_for_twistd(
        parse_log_format(config.log_format), getattr(options, "parent", None), worker,
        config.instance_id, config.log_level,
    )
    for warning in config.warnings:
        log.warn("Configuration: {warning}", warning=warning)

    fast = fastpath.select(config.fast_paths, reactor)
    if "lean_poll" in fast:
        lean_poll.install(reactor)
    cork = Cork() if "eager_write" in fast else None
    table = options.backends_table
    idle_per_host = sum(b.max_concurrent for b in table.backends) + 2
    agent: IAgent
    pool: ConnectionPool
    if "backend_client" in fast:
        agent = pool = forward.make_client(
            reactor, idle_per_host, config.backend_connect_timeout, cork)
    else:
        agent, pool = forward.make_agent(reactor, idle_per_host, config.backend_connect_timeout)
    backends = BackendSet(config, reactor, agent, options.llama_server_path,
                          options.backends_file)
    state = slots = None
    if config.state_url is not None:
        from llamaproxy.state.redis_store import RedisState
        from llamaproxy.state.slot_leases import SharedSlots

        state = RedisState(config.state_url, reactor, config.state_failure, cork=cork)
        slots = SharedSlots(state, config.instance_id)
        backends.on_admission = slots.attach
        backends.on_retired = slots.retire
    router = backends.apply(table)
    primary = router.members[table.backends_for(table.default_model)[0].name]
    backend, admission = primary.status, cast(Admission, primary.load)
    background: list[IService] = []
    on_sighup: list[Callable[[], object]] = []

    access = _access_control(config, reactor, background, on_sighup, state)
    metrics = GatewayMetrics(reactor)
    backends.add_model_events(metrics.models)
    metrics.fast_paths(fast.active, fastpath.ALL)
    background.append(LoopProbe(reactor, metrics.registry))
    metrics.watch_admission(admission)
    for member in router.members.values():
        metrics.watch_backend(member.status)
        if member.spec.kind == "local":
            scraper = BackendMetricsScraper(member.status, agent, reactor)
            metrics.add_scraper(scraper)
            background.append(scraper)
    recorder = _recorder(config, reactor, metrics, access, background, on_sighup)
    if state is not None:
        from llamaproxy.state.usage_counters import SharedUsage

        recorder.shared_usage = SharedUsage(state)
        background.append(recorder.shared_usage)

    tls = _tls(config, reactor, background, on_sighup)
    if tls is not None:
        metrics.watch_certificate(tls.seconds_until_expiry)
    settings = GatewaySettings(
        request_timeout=config.request_timeout,
        stream_idle_timeout=config.stream_idle_timeout,
        queue_timeout=config.queue_timeout,
        load_timeout=config.load_timeout,
        first_byte_timeout=config.first_byte_timeout,
        extra_paths=frozenset(p.encode() for p in config.proxy_extra_paths),
        metrics_auth_enabled=config.metrics_auth_enabled,
        hsts=hsts_header(config.hsts_max_age) if config.hsts_max_age else None,
        log_requests=recorder.access_log is None,
    )
    resource_holder: list[GatewayResource] = []
    health = HealthState(
        backend, admission, reactor, config.auth_enabled,
        draining=lambda: bool(resource_holder and resource_holder[0].draining),
    )
    health.fast_paths = fast.document()
    resource = GatewayResource(
        router, agent, reactor, settings, access, health.document, health.ready, metrics=metrics
    )
    resource.local_model_list = options.backends_file is not None
    resource.model_admin = ModelAdmin(backends, config.drain_timeout)
    metrics.watch_router(lambda: resource.router)
    health.router = lambda: resource.router
    if not config.metrics_auth_enabled:  # /health is public: the counters only if /metrics is
        health.legacy_metrics = lambda: metrics.legacy_json()["gateway"]
    if state is not None and slots is not None:
        shared_slots = slots
        shared_limits = access.shared
        health.state_store = lambda: {
            **state.status_json(),
            "limits": shared_limits.status_json() if shared_limits is not None else None,
            "slot_leases": shared_slots.status_json(),
        }
        metrics.watch_state_store(state, shared_slots)
        if config.state_failure == "closed":
            health.state_store_ready = lambda: state.health != "down"

    resource_holder.append(resource)
    if options.backends_file is not None:
        on_sighup.append(lambda: backends.reload(OffThread.pool(reactor)).addCallback(
            lambda router: setattr(resource, "router", router) if router is not None else None))
    if config.admin_listen:
        background.append(_operator_page(config, reactor, resource, backends, access, metrics,
                                         recorder))
    site = GatewaySite(
        resource, _limits(config), _cors(config), reactor=reactor, recorder=recorder,
        body_budget=BodyBudget(config.max_queue_bytes, config.max_queue_bytes_per_key),
        trusted_proxies=TrustedProxies(parse_trusted_proxies(config.trusted_proxies)),
        cork=cork, fast_headers=bool(fast.active),
    )
    listeners = _gateway_listeners(config, site, reactor, tls)
    if config.metrics_listen:
        metrics_site = Site(MetricsResource(metrics, include_per_key=True))
        metrics_site.log = lambda request: None  # type: ignore[method-assign]
        listeners.append(strports.service(config.metrics_listen, metrics_site, reactor=reactor))
    health_listener = None
    if config.health_endpoint is not None:
        health_site = health_port_site(health, _limits(config), reactor)
        health_listener = strports.service(config.health_endpoint, health_site, reactor=reactor)
    _on_sighup(reactor, on_sighup)
    if state is not None and slots is not None:
        background += [slots, state]  # last: stopped after what gives back or flushes to it
    endpoints = [f"tls:{config.port}", *config.listen] if tls is not None else config.endpoints
    log.info(
        "llamaproxy {version}: gateway on {endpoints}, health on {health}, operator page on "
        "{admin}, backends {backends}, default model {model}, auth {auth}",
        version=__version__, endpoints=", ".join(endpoints),
        health=config.health_endpoint or "off", admin=config.admin_listen or "off",
        backends=", ".join(f"{m.name} ({m.slots} slots)" for m in router.members.values()),
        model=table.default_model, auth="on" if config.auth_enabled else "off",
    )
    return GatewayService(
        reactor, backends, listeners, health_listener, resource, pool, config.drain_timeout,
        background=background, log_observer=observer,
        gc_schedule=GcSchedule(reactor) if "gc_schedule" in fast else None,
        # Under twistd (it gave the options a parent) the gateway's own signal handlers.
        stop_signals=StopSignals(reactor) if getattr(options, "parent", None) else None,
    )


def _access_control(
    config: Config, reactor: Any, background: list[IService], on_sighup: list[Callable[[], object]],
    state: Any = None,
) -> AccessControl:
    keys = KeyStore(config.auth_keys_file, off_thread=OffThread.pool(reactor))
    if config.auth_enabled and config.keys_store == "redis" and state is not None:
        from llamaproxy.state.key_store import KeyPoller, RedisKeyStore

        keys = RedisKeyStore(state)  # no keys until Redis answers: 401 meanwhile (fail closed)
        on_sighup.append(lambda: _reload_keys(keys))
        background.append(KeyPoller(keys, reactor))
    elif config.auth_enabled:
        # fail closed: no keys, every API request gets 401 until the file is fixed
        with contextlib.suppress(KeyLoadError):
            keys.load()
        on_sighup.append(lambda: _reload_keys(keys))
        background.append(
            KeyFileWatcher(keys, reactor, config.keys_reload_interval, notify_reactor=reactor))
    else:
        log.warn("Authentication is disabled (AUTH_ENABLED=false): anyone can use the API")
    token_limits = None
    limits_class = TokenLimits
    if state is not None:
        from llamaproxy.state.limits import SharedTokenLimits

        limits_class = SharedTokenLimits
    if config.tokens_per_minute or config.key_tokens_per_minute:
        token_limits = limits_class(
            TokenRateLimiter(reactor), config.tokens_per_minute, dict(config.key_tokens_per_minute)
        )
    limiter = RateLimiter(reactor, config.max_requests_per_minute)
    shared = None
    if state is not None:
        from llamaproxy.state.limits import SharedLimits, SharedTokenLimits

        shared = SharedLimits(state, limiter, token_limits)
        if isinstance(token_limits, SharedTokenLimits):
            token_limits.shared = shared
    return AccessControl(
        keys,
        limiter,
        auth_enabled=config.auth_enabled,
        admin_key_ids=frozenset(config.admin_key_ids),
        token_limits=token_limits,
        shared=shared,
    )


def _operator_page(
    config: Config,
    reactor: Any,
    resource: GatewayResource,
    backends: BackendSet,
    access: AccessControl,
    metrics: GatewayMetrics,
    recorder: RequestRecorder,
) -> IService:
    """ADMIN_LISTEN: the operator's web page (llamaproxy/admin/)."""
    from twisted.logger import globalLogPublisher

    from llamaproxy.admin.service import operator_page

    return operator_page(
        config.admin_listen, reactor,
        router=lambda: resource.router,
        services=lambda: backends.by_name,
        keys=access.store,
        admin_key_ids=frozenset(config.admin_key_ids),
        session_ttl=config.admin_session_ttl,
        metrics=metrics,
        recorder=recorder,
        log_publisher=globalLogPublisher,
    )


def _reload_keys(keys: KeyStore) -> None:
    keys.refresh("SIGHUP").addErrback(lambda f: f.trap(KeyLoadError) and None)


def _recorder(
    config: Config,
    reactor: Any,
    metrics: GatewayMetrics,
    access: AccessControl,
    background: list[IService],
    on_sighup: list[Callable[[], object]],
) -> RequestRecorder:
    access_log = None
    path = resolve_access_log(config.access_log, config.data_dir)
    if path is not None:
        access_log = AccessLog(
            path, parse_log_format(config.access_log_format), reactor, config.instance_id,
            config.worker_type or None,
        )
        on_sighup.append(access_log.reopen)
        reactor.addSystemEventTrigger("after", "shutdown", access_log.close)
    ledger = None
    ledger_path = resolve_ledger_path(config.usage_ledger, config.data_dir)
    if ledger_path is not None:
        ledger = UsageLedger(ledger_path, reactor, reactor)
        background.append(ledger)
    return RequestRecorder(reactor, access_log, metrics, ledger, access.token_limits)


def _tls(
    config: Config, reactor: Any, background: list[IService], on_sighup: list[Callable[[], object]]
) -> ReloadingContextFactory | None:
    if not config.tls_cert_file or not config.tls_key_file:
        return None
    settings = TLSSettings(
        config.tls_cert_file, config.tls_key_file, config.tls_chain_file, config.tls_min_version
    )
    try:
        factory = ReloadingContextFactory(settings, reactor, OffThread.pool(reactor))
    except TLSConfigError as e:
        raise usage.UsageError(str(e)) from None
    background.append(CertificateWatcher(factory, reactor))
    on_sighup.append(lambda: factory.refresh("SIGHUP"))
    return factory


def _limits(config: Config) -> RequestLimits:
    return RequestLimits(
        max_request_line=config.max_request_line_size,
        max_header_line=config.max_header_line_size,
        max_headers=config.max_headers,
        max_body=config.max_request_body_size,
        client_timeout=config.client_header_timeout,
        max_json_depth=config.max_json_depth,
        max_json_values=config.max_json_values,
    )


def _cors(config: Config) -> CorsPolicy:
    cors = CorsPolicy.from_entries(config.cors_origins)
    for warning in cors.warnings():
        log.warn("Configuration: {warning}", warning=warning)
    return cors


def _gateway_listeners(
    config: Config, site: GatewaySite, reactor: Any, tls: ReloadingContextFactory | None
) -> list[IService]:
    """--listen endpoints; PORT over TLS beside them when a certificate is configured."""
    listeners: list[IService] = []
    if tls is not None:
        endpoint = tls_server_endpoint(reactor, config.port, config.host or "0.0.0.0", tls,
                                       backlog=config.listen_backlog)
        listener = StreamServerEndpointService(endpoint, site)
        listener._raiseSynchronously = True  # a bind failure is a startup error, as strports
        listeners.append(listener)
        specs: tuple[str, ...] = config.listen
    else:
        specs = config.endpoints
    listeners.extend(strports.service(spec, site, reactor=reactor) for spec in specs)
    return listeners


def _on_sighup(reactor: Any, actions: list[Callable[[], object]]) -> None:
    """SIGHUP re-reads the key file, reopens the access log and reloads the TLS certificate."""
    if not actions or not hasattr(signal, "SIGHUP"):
        return

    def reload() -> None:
        for action in actions:
            try:
                action()
            except Exception:
                log.failure("Error while handling SIGHUP")

    def handler(signum: int, frame: object) -> None:
        reactor.callFromThread(reload)

    signal.signal(signal.SIGHUP, handler)
