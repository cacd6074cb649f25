"""`twistd llamaproxy`: command-line options and the composition root.

This is the only module that touches the global reactor (and only inside ``makeService``); every
other part takes its reactor, clock or agent as a parameter.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, Service
from twisted.logger import Logger
from twisted.python import usage

from llamaproxy import __version__
from llamaproxy.admission import Admission
from llamaproxy.auth.access import AccessControl
from llamaproxy.auth.ratelimit import RateLimiter
from llamaproxy.auth.store import KeyFileWatcher, KeyLoadError, KeyStore
from llamaproxy.backend import Backend
from llamaproxy.config import SETTINGS, Config, ConfigError, load_config
from llamaproxy.cors import CorsPolicy
from llamaproxy.gateway import forward
from llamaproxy.gateway.resource import GatewayResource, GatewaySettings
from llamaproxy.gateway.site import GatewaySite, RequestLimits
from llamaproxy.health import HealthSite, HealthState
from llamaproxy.service import GatewayService

log = Logger()

#: Concurrency when neither MAX_CONCURRENT_REQUESTS nor PARALLEL says (llama-server's own default
#: with --parallel auto is 4 slots).
DEFAULT_CONCURRENCY = 4


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
            if self.config.supervised:
                from llamaproxy.llama_server import find_llama_server

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
    for warning in config.warnings:
        log.warn("Configuration: {warning}", warning=warning)

    backend = Backend(
        name="llama-server" if config.supervised else config.backend_base_url,
        base_url=config.backend_base_url,
        api_key=config.backend_api_key,
        model=config.model_alias,
        slots=config.parallel or None,
    )
    concurrency = config.max_concurrent_requests or config.parallel or DEFAULT_CONCURRENCY
    admission = Admission(concurrency, config.max_queue_size, config.max_queue_per_key)
    pool = forward.make_pool(reactor, concurrency + 2)
    agent = forward.make_agent(reactor, pool, config.backend_connect_timeout)

    backend_service = _backend_service(config, options, backend, reactor, agent)

    keys = KeyStore(config.auth_keys_file)
    background: list[IService] = []
    if config.auth_enabled:
        # fail closed: no keys, every API request gets 401 until the file is fixed
        with contextlib.suppress(KeyLoadError):
            keys.load()
        _reload_keys_on_sighup(reactor, keys)
        background.append(KeyFileWatcher(keys, reactor, config.keys_reload_interval))
    else:
        log.warn("Authentication is disabled (AUTH_ENABLED=false): anyone can use the API")
    access = AccessControl(
        keys,
        RateLimiter(reactor, config.max_requests_per_minute),
        auth_enabled=config.auth_enabled,
        admin_key_ids=frozenset(config.admin_key_ids),
    )

    settings = GatewaySettings(
        request_timeout=config.request_timeout,
        stream_idle_timeout=config.stream_idle_timeout,
        queue_timeout=config.queue_timeout,
        first_byte_timeout=config.first_byte_timeout,
        extra_paths=frozenset(p.encode() for p in config.proxy_extra_paths),
    )
    resource_holder: list[GatewayResource] = []
    health = HealthState(
        backend, admission, reactor, config.auth_enabled,
        draining=lambda: bool(resource_holder and resource_holder[0].draining),
    )
    resource = GatewayResource(
        backend, agent, admission, reactor, settings, access, health.document, health.ready
    )
    resource_holder.append(resource)
    limits = RequestLimits(
        max_request_line=config.max_request_line_size,
        max_header_line=config.max_header_line_size,
        max_headers=config.max_headers,
        max_body=config.max_request_body_size,
        client_timeout=config.client_header_timeout,
    )
    cors = CorsPolicy.from_entries(config.cors_origins)
    for warning in cors.warnings():
        log.warn("Configuration: {warning}", warning=warning)
    site = GatewaySite(resource, limits, cors, reactor=reactor)
    listeners = [strports.service(endpoint, site, reactor=reactor) for endpoint in config.endpoints]
    health_listener = None
    if config.health_endpoint is not None:
        from twisted.web.server import Site

        health_site = Site(HealthSite(health).app.resource())
        health_site.log = lambda request: None  # type: ignore[method-assign]
        health_listener = strports.service(config.health_endpoint, health_site, reactor=reactor)
    log.info(
        "llamaproxy {version}: gateway on {endpoints}, health on {health}, backend {backend}, "
        "model {model}, {concurrency} concurrent, auth {auth}",
        version=__version__, endpoints=", ".join(config.endpoints),
        health=config.health_endpoint or "off", backend=config.backend_base_url,
        model=config.model_alias, concurrency=concurrency,
        auth="on" if config.auth_enabled else "off",
    )
    return GatewayService(
        reactor, backend_service, listeners, health_listener, resource, pool, config.drain_timeout,
        background=background,
    )


def _backend_service(
    config: Config, options: Options, backend: Backend, reactor: Any, agent: Any
) -> Service:
    if not config.supervised:
        from llamaproxy.probe import ExternalBackendMonitor

        return ExternalBackendMonitor(
            backend, agent, reactor, config.probe_interval, config.health_timeout
        )
    from llamaproxy.llama_server import (
        BackendKeyFile,
        build_args,
        child_environment,
        spawn_command,
    )
    from llamaproxy.supervisor import LlamaServerSupervisor, SupervisorTimings

    key_file = BackendKeyFile(config.key_dir, config.instance_id)
    backend.api_key = key_file.key
    return LlamaServerSupervisor(
        backend=backend,
        executable=options.llama_server_path,
        args=build_args(config, key_file.path),
        env=child_environment(os.environ),
        key_file=key_file,
        reactor=reactor,
        agent=agent,
        timings=SupervisorTimings.from_config(config),
        launcher=spawn_command,
    )


def _reload_keys_on_sighup(reactor: Any, keys: KeyStore) -> None:
    def reload() -> None:
        with contextlib.suppress(KeyLoadError):
            keys.load("SIGHUP")

    def on_sighup(signum: int, frame: object) -> None:
        reactor.callFromThread(reload)

    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_sighup)
