"""The backends file (TOML, ``--config`` / ``LLAMAPROXY_CONFIG``): backends, models, routing policy.

It declares supervised llama-server children (``model_path``) and remote OpenAI-compatible
upstreams (``base_url``), the model names each serves, and per-model routing (``[models.<name>]``),
circuit breaker defaults (``[breaker]``), failover (``[failover]``), per-key model allowlists
(``[keys.<key_id>]``), defaults for local children (``[local]``), and models started on demand
(``start = "on_demand"``, ``idle_ttl``, ``group``) with their swap groups (``[[groups]]``).
Parsing is strict: a wrong type, a bad value or an unknown key is a ``BackendsFileError``
naming the file, the table and the key, e.g. ``backends.toml: backends[1].base_url: expected
an http(s) URL``. Without a file, ``single_backend_table`` builds the same structures from the
environment-variable ``Config``. docs/routing.md describes every key.

Its size is the schema: every table and key of the file is parsed and validated here, with an error
naming the file, the table and the key, so the rules stay in one place (splitting it would split
the schema).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, NamedTuple, TypeVar
from urllib.parse import urlsplit

from llamaproxy.backends.affinity import AffinitySettings, PrefixRule
from llamaproxy.backends.breaker import BreakerSettings
from llamaproxy.bounded_file import read_bounded
from llamaproxy.config import Config, ConfigError, sanitize_instance_id

#: What a local child's base URL is when no port is given: PORT_BACKEND's default.
DEFAULT_PORT_BASE = 8080
#: Concurrency of a backend whose slots are unknown (llama-server's --parallel auto is 4).
DEFAULT_SLOTS = 4

_T = TypeVar("_T")
_D = TypeVar("_D", BreakerSettings, "LocalDefaults")

_BACKEND_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_KEY_ID = re.compile(r"[A-Za-z0-9_-]+")  # as in the key file (llamaproxy.auth.keys)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class BackendsFileError(ConfigError):
    """The backends file cannot be read or is invalid; the message names file, table and key."""


class Strategy(enum.Enum):
    """How the backends serving one model are ordered for a request."""

    PRIORITY = "priority"  # lowest priority first, ready ones before recovering ones
    ROUND_ROBIN = "round-robin"  # smooth weighted round-robin (nginx's)
    LEAST_BUSY = "least-busy"  # fewest in-flight requests relative to slots
    # by prompt prefix (llamaproxy.backends.affinity), bounded load
    CACHE_AFFINITY = "cache_affinity"


class Start(enum.Enum):
    """When a local child runs: from boot (``always``) or when its model is asked for."""

    ALWAYS = "always"
    ON_DEMAND = "on_demand"


#: A group's ``swap_grace``, ``swap_batch`` and ``swap_wait`` when the file does not give them.
DEFAULT_SWAP_GRACE = 30.0
DEFAULT_SWAP_BATCH = 4
DEFAULT_SWAP_WAIT = 10.0


@dataclass(frozen=True)
class GroupSpec:
    """A ``[[groups]]`` table: on-demand backends that share a budget (a GPU's memory)."""

    name: str
    #: Members running at once; a model asked for beyond it is swapped in. 0: no limit.
    max_running: int = 0
    #: Longest wait, once a swap is due, for the running model's requests in flight to end.
    swap_grace: float = DEFAULT_SWAP_GRACE
    #: Requests of the running model served, while another model waits, before the swap.
    swap_batch: int = DEFAULT_SWAP_BATCH
    #: Members started at boot (at most ``max_running`` when it is set).
    preload: tuple[str, ...] = ()
    #: Longest wait of a waiting model for the running one's batch before the swap starts.
    swap_wait: float = DEFAULT_SWAP_WAIT


@dataclass(frozen=True)
class Timeouts:
    """Per-backend timeouts in seconds; None means the gateway-wide setting."""

    connect: float | None = None
    first_byte: float | None = None
    request: float | None = None


@dataclass(frozen=True)
class FailoverSettings:
    """The ``[failover]`` table."""

    #: Backends one request may be sent to, the first included.
    max_attempts: int = 3


@dataclass(frozen=True)
class LocalDefaults:
    """Defaults of local children; the ``[local]`` table overrides them."""

    port_base: int = DEFAULT_PORT_BASE
    ctx: int = 16384
    ngl: int = 99
    threads: int = 0
    parallel: int = 0
    #: Ports auto-assignment skips and explicit ports may not use (the gateway's own).
    reserved_ports: frozenset[int] = frozenset()

    @classmethod
    def from_config(cls, config: Config) -> LocalDefaults:
        """Defaults from the environment: PORT_BACKEND, CTX, NGL, THREADS, PARALLEL."""
        return cls(
            port_base=config.backend_port or DEFAULT_PORT_BASE,
            ctx=config.ctx,
            ngl=config.ngl,
            threads=config.threads,
            parallel=config.parallel,
            reserved_ports=frozenset({config.port, config.health_port} - {0}),
        )


@dataclass(frozen=True, kw_only=True)
class _BackendCommon:
    """What every backend has, local or remote."""

    name: str
    #: Model names served; the first is canonical (a local child's ``--alias``).
    models: tuple[str, ...]
    priority: int = 0
    weight: int = 1
    #: Requests sent at once (one Admission per backend); None: see ``max_concurrent``.
    slots: int | None = None
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    timeouts: Timeouts = field(default_factory=Timeouts)
    #: (model, name the upstream knows it by) pairs, for the request body's "model".
    upstream_models: tuple[tuple[str, str], ...] = ()

    @property
    def canonical_model(self) -> str:
        """The backend's first model name."""
        return self.models[0]

    def upstream_model(self, model: str) -> str:
        """The "model" value to send this backend for ``model`` (a canonical model name)."""
        return dict(self.upstream_models).get(model, model)


@dataclass(frozen=True, kw_only=True)
class LocalBackendSpec(_BackendCommon):
    """A llama-server child this process supervises, on 127.0.0.1:``port``."""

    kind: ClassVar[str] = "local"
    model_path: str
    port: int
    ctx: int = 16384
    ngl: int = 99
    threads: int = 0
    parallel: int = 0
    extra_args: tuple[str, ...] = ()
    #: Environment variables the operator gives the child on top of the allowlisted ones
    #: (``llama_server.child_environment``), as (name, value) pairs.
    child_env: tuple[tuple[str, str], ...] = ()
    #: ``always``: started at boot and kept running; ``on_demand``: started by a request.
    start: Start = Start.ALWAYS
    #: On demand: seconds without a request before the child is stopped (0: never).
    idle_ttl: float = 0.0
    #: On demand: the ``[[groups]]`` it belongs to (None: none, no swapping).
    group: str | None = None

    @property
    def on_demand(self) -> bool:
        """True when the child runs only while its model is asked for."""
        return self.start is Start.ON_DEMAND

    @property
    def base_url(self) -> str:
        """Where requests go: the child's root (paths are joined as they come)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_key(self) -> str | None:
        """None: a child's key is the per-boot key of its supervisor."""
        return None

    @property
    def max_concurrent(self) -> int:
        """Slots of this backend's Admission: ``slots``, else ``parallel``, else 4."""
        return self.slots or self.parallel or DEFAULT_SLOTS

    @property
    def known_slots(self) -> int | None:
        """``Backend.slots``: the child's --parallel when set."""
        return self.parallel or None

    def child_config(self, base: Config) -> Config:
        """``base`` rewritten for this child, for ``build_args`` and ``SupervisorTimings``.

        The instance id gets the backend name appended, so each child has its own key file.
        """
        return dataclasses.replace(
            base,
            backend_url=None,
            backend_api_key=None,
            model_path=self.model_path,
            backend_port=self.port,
            ctx=self.ctx,
            ngl=self.ngl,
            threads=self.threads,
            parallel=self.parallel,
            extra_args=self.extra_args,
            model_alias=self.canonical_model,
            instance_id=sanitize_instance_id(f"{base.instance_id}-{self.name}"),
        )


@dataclass(frozen=True, kw_only=True)
class RemoteBackendSpec(_BackendCommon):
    """An OpenAI-compatible upstream (another llama-server, vLLM, a hosted API)."""

    kind: ClassVar[str] = "remote"
    base_url: str
    #: The environment variable the key was read from (None: no key sent).
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)
    verify_tls: bool = True
    #: Send a request again after a failure even when it may have run (a POST written whole
    #: that got no answer). Off: an upstream that bills per request would bill twice.
    retry_non_idempotent: bool = False

    @property
    def max_concurrent(self) -> int:
        """Slots of this backend's Admission: ``slots``, else 4."""
        return self.slots or DEFAULT_SLOTS

    @property
    def known_slots(self) -> int | None:
        """``Backend.slots``: the declared slots."""
        return self.slots


BackendSpec = LocalBackendSpec | RemoteBackendSpec


@dataclass(frozen=True)
class ModelSpec:
    """A model name clients may ask for, and how its backends are chosen."""

    name: str
    strategy: Strategy = Strategy.PRIORITY
    aliases: tuple[str, ...] = ()
    default: bool = False
    #: ``cache_affinity`` only: this model's ``pin_slot`` (None: ``[affinity] pin_slot``).
    pin_slot: bool | None = None


@dataclass(frozen=True)
class BackendsTable:
    """Everything the backends file says, validated (or its single-backend equivalent)."""

    backends: tuple[BackendSpec, ...]
    #: Every served model, in order of first appearance in the backends.
    models: tuple[ModelSpec, ...]
    default_model: str
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    failover: FailoverSettings = field(default_factory=FailoverSettings)
    #: key id -> canonical models it may use; keys not listed may use every model.
    key_models: Mapping[str, frozenset[str]] = field(default_factory=dict)
    #: The file it came from (None: built from the environment).
    source: str | None = None
    #: True: an unknown model name is served by the default model (single-backend mode, where
    #: llama-server ignores the name); False: it is unknown (404).
    route_unknown_models: bool = False
    #: The ``[affinity]`` table (models whose strategy is ``cache_affinity``).
    affinity: AffinitySettings = field(default_factory=AffinitySettings)
    #: The ``[[groups]]`` of on-demand backends.
    groups: tuple[GroupSpec, ...] = ()

    def group(self, name: str) -> GroupSpec:
        """The group called ``name`` (KeyError when there is none)."""
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)

    def group_members(self, name: str) -> tuple[LocalBackendSpec, ...]:
        """The backends of group ``name``, in declaration order."""
        return tuple(spec for spec in self.backends
                     if isinstance(spec, LocalBackendSpec) and spec.group == name)

    @cached_property
    def prefix_rule(self) -> PrefixRule | None:
        """How request bodies are hashed, or None when no model routes by prefix."""
        if any(m.strategy is Strategy.CACHE_AFFINITY for m in self.models):
            return PrefixRule.of(self.affinity)
        return None

    def backend(self, name: str) -> BackendSpec:
        """The backend called ``name`` (KeyError when there is none)."""
        for spec in self.backends:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def backend_names(self) -> tuple[str, ...]:
        """Backend names in declaration order."""
        return tuple(spec.name for spec in self.backends)

    def model(self, name: str) -> ModelSpec:
        """The model called ``name`` (canonical; KeyError when there is none)."""
        return self._names[1][name]

    def lookup(self, name: str) -> str | None:
        """The canonical model for a model name or alias, or None."""
        return self._names[0].get(name)

    @cached_property
    def _names(self) -> tuple[dict[str, str], dict[str, ModelSpec]]:
        """``lookup`` and ``model`` as dicts, computed once (every request asks them): the
        first model with the name (or alias) wins, as in a scan of ``models``."""
        canonical: dict[str, str] = {}
        models: dict[str, ModelSpec] = {}
        for model in self.models:
            models.setdefault(model.name, model)
            for name in (model.name, *model.aliases):
                canonical.setdefault(name, model.name)
        return canonical, models

    def backends_for(self, model: str) -> tuple[BackendSpec, ...]:
        """The backends serving ``model`` (canonical name), in declaration order."""
        return self._backends_by_model.get(model, ())

    @cached_property
    def _backends_by_model(self) -> dict[str, tuple[BackendSpec, ...]]:
        """``backends_for`` of every served model, computed once (it runs on every request)."""
        return {
            model.name: tuple(spec for spec in self.backends if model.name in spec.models)
            for model in self.models
        }


class TableDiff(NamedTuple):
    """Backend names added, removed and changed between two tables (``diff``)."""

    added: frozenset[str]
    removed: frozenset[str]
    changed: frozenset[str]


def diff(old: BackendsTable, new: BackendsTable) -> TableDiff:
    """What a reload changes: start ``added``, drain and stop ``removed``, update ``changed``.

    For a changed backend, ``needs_restart`` says whether its child (or its connection settings)
    must be replaced or only its routing attributes (models, priority, weight, breaker) changed.
    """
    old_specs = {spec.name: spec for spec in old.backends}
    new_specs = {spec.name: spec for spec in new.backends}
    return TableDiff(
        added=frozenset(new_specs.keys() - old_specs.keys()),
        removed=frozenset(old_specs.keys() - new_specs.keys()),
        changed=frozenset(
            name for name in old_specs.keys() & new_specs.keys()
            if old_specs[name] != new_specs[name]
        ),
    )


def needs_restart(old: BackendSpec, new: BackendSpec) -> bool:
    """True when a changed backend's child process or upstream must be replaced.

    Local: model_path, port, ctx, ngl, threads, parallel, extra_args, child_env or the canonical
    model (its ``--alias``). Remote: base_url, the key or verify_tls. Anything else (models,
    priority, weight, slots, timeouts, breaker, upstream_models, retry_non_idempotent, start,
    idle_ttl, group) is applied without a restart.
    """
    return _launch_identity(old) != _launch_identity(new)


def _launch_identity(spec: BackendSpec) -> tuple[object, ...]:
    if isinstance(spec, LocalBackendSpec):
        return ("local", spec.model_path, spec.port, spec.ctx, spec.ngl, spec.threads,
                spec.parallel, spec.extra_args, spec.canonical_model, spec.child_env)
    return ("remote", spec.base_url, spec.api_key, spec.verify_tls)


def upstream_url(base_url: str, target: str) -> str:
    """The URL to send a request for ``target`` (path and query) to, on a backend at ``base_url``.

    A base URL whose path ends in ``/v1`` (OpenAI style, ``http://host:9000/v1``) stands for the
    request's ``/v1``: ``/v1/chat/completions`` → ``http://host:9000/v1/chat/completions``, and a
    path outside ``/v1`` (``/tokenize``) goes to the base without its ``/v1``. Any other base URL
    (a local child's ``http://127.0.0.1:PORT``, or one with a path prefix) is prefixed as is.
    """
    base = base_url.rstrip("/")
    if not base.endswith("/v1") or urlsplit(base).path in ("", "/"):
        return base + target
    if target == "/v1" or target.startswith(("/v1/", "/v1?")):
        return base + target[3:]
    return base[:-3] + target


def upstream_url_bytes(base_url: str, target: bytes) -> bytes:
    """``upstream_url`` for Twisted's bytes (``request.uri`` → ``agent.request``)."""
    return upstream_url(base_url, target.decode("latin-1")).encode("latin-1")


def single_backend_table(config: Config) -> BackendsTable:
    """The table equivalent to today's single-model mode (no backends file).

    One backend (the supervised child, or BACKEND_URL) serving MODEL_ALIAS, strategy priority,
    every model name routed to it, and no circuit breaker.
    """
    no_breaker = BreakerSettings(enabled=False)
    timeouts = Timeouts(
        config.backend_connect_timeout, config.first_byte_timeout, config.request_timeout
    )
    spec: BackendSpec
    if config.backend_url is None:
        spec = LocalBackendSpec(
            name="llama-server",
            models=(config.model_alias,),
            slots=config.max_concurrent_requests or None,
            breaker=no_breaker,
            timeouts=timeouts,
            model_path=config.model_path or "",
            port=config.backend_port,
            ctx=config.ctx,
            ngl=config.ngl,
            threads=config.threads,
            parallel=config.parallel,
            extra_args=config.extra_args,
        )
    else:
        spec = RemoteBackendSpec(
            name=config.backend_url,
            models=(config.model_alias,),
            slots=config.max_concurrent_requests or config.parallel or None,
            breaker=no_breaker,
            timeouts=timeouts,
            base_url=config.backend_url,
            api_key_env="BACKEND_API_KEY" if config.backend_api_key else None,
            api_key=config.backend_api_key,
        )
    return BackendsTable(
        backends=(spec,),
        models=(ModelSpec(config.model_alias, Strategy.PRIORITY, (), True),),
        default_model=config.model_alias,
        breaker=no_breaker,
        failover=FailoverSettings(),
        route_unknown_models=True,
    )


# -- loading ------------------------------------------------------------------------------------


def load_backends_file(
    path: str,
    environ: Mapping[str, str],
    *,
    defaults: LocalDefaults | None = None,
    is_file: Callable[[str], bool] = os.path.isfile,
) -> BackendsTable:
    """Read and validate the backends file at ``path``.

    ``environ`` supplies the ``api_key_env`` variables; a relative ``model_path`` is relative to
    the file's directory. Raises ``BackendsFileError`` naming the file, the table and the key.
    """
    try:
        data = tomllib.loads(read_bounded(path).decode("utf-8"))
    except UnicodeDecodeError:
        raise BackendsFileError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise BackendsFileError(f"{path}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise BackendsFileError(f"{path}: not valid TOML: {e}") from None
    return parse_backends(
        data, path, environ, defaults=defaults, is_file=is_file,
        base_dir=os.path.dirname(os.path.abspath(path)),
    )


def parse_backends_text(
    text: str,
    source: str,
    environ: Mapping[str, str],
    *,
    defaults: LocalDefaults | None = None,
    is_file: Callable[[str], bool] = os.path.isfile,
    base_dir: str | None = None,
) -> BackendsTable:
    """``load_backends_file`` for TOML text already in memory (``source`` names it in errors)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BackendsFileError(f"{source}: not valid TOML: {e}") from None
    return parse_backends(
        data, source, environ, defaults=defaults, is_file=is_file, base_dir=base_dir
    )


_TOP_KEYS = ("backends", "models", "breaker", "failover", "keys", "local", "affinity", "groups")
_GROUP_KEYS = ("name", "max_running", "swap_grace", "swap_batch", "swap_wait", "preload")
_AFFINITY_KEYS = (
    "prefix_chars", "prefix_messages", "min_prompt_chars", "load_factor", "remembered",
    "pin_slot",
)
_COMMON_KEYS = (
    "name", "models", "priority", "weight", "slots", "breaker", "connect_timeout",
    "first_byte_timeout", "request_timeout", "upstream_models",
)
_LOCAL_KEYS = ("model_path", "port", "ctx", "ngl", "threads", "parallel", "extra_args",
               "child_env", "start", "idle_ttl", "group")
_REMOTE_KEYS = ("base_url", "api_key_env", "verify_tls", "retry_non_idempotent")
_BREAKER_KEYS = ("failure_threshold", "reset_timeout", "success_threshold", "half_open_max",
                 "enabled")
_MODEL_KEYS = ("strategy", "aliases", "default", "pin_slot")
_LOCAL_DEFAULT_KEYS = ("port_base", "ctx", "ngl", "threads", "parallel")


def _key_path(parent: str, key: str) -> str:
    shown = key if _BARE_KEY.fullmatch(key) else '"' + key.replace('"', '\\"') + '"'
    return f"{parent}.{shown}" if parent else shown


class _Table:
    """One TOML table being validated: typed getters whose errors say where."""

    def __init__(self, data: object, where: str, source: str) -> None:
        self.where = where
        self.source = source
        if not isinstance(data, dict):
            raise self.error_at(where, f"expected a table, got {_type_name(data)}")
        self.data: dict[str, Any] = data

    def error_at(self, where: str, message: str) -> BackendsFileError:
        return BackendsFileError(f"{self.source}: {where}: {message}")

    def error(self, key: str, message: str) -> BackendsFileError:
        return self.error_at(self.path(key), message)

    def path(self, key: str) -> str:
        return _key_path(self.where, key)

    def check_keys(self, allowed: Sequence[str]) -> None:
        for key in self.data:
            if key not in allowed:
                raise self.error(key, f"unknown key (expected one of: {', '.join(allowed)})")

    def has(self, key: str) -> bool:
        return key in self.data

    def table(self, key: str) -> _Table | None:
        if key not in self.data:
            return None
        return _Table(self.data[key], self.path(key), self.source)

    def string(self, key: str) -> str | None:
        if key not in self.data:
            return None
        value = self.data[key]
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_type_name(value)}")
        if not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def integer(self, key: str, minimum: int = -(2**63), maximum: int | None = None
                ) -> int | None:
        """An integer (booleans are not) within ``minimum``..``maximum``, or None if absent."""
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_type_name(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise self.error(key, f"expected an integer {bound}, got {value}")
        return value

    def seconds(self, key: str) -> float | None:
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected a number of seconds, got {_type_name(value)}")
        if not math.isfinite(value) or value <= 0:
            raise self.error(key, f"expected a number of seconds > 0, got {value}")
        return float(value)

    def boolean(self, key: str) -> bool | None:
        if key not in self.data:
            return None
        value = self.data[key]
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_type_name(value)}")
        return value

    def strings(self, key: str, *, non_empty: bool = False) -> tuple[str, ...] | None:
        if key not in self.data:
            return None
        value = self.data[key]
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of strings, got {_type_name(value)}")
        if non_empty and not value:
            raise self.error(key, "must list at least one entry")
        items: list[str] = []
        for index, item in enumerate(value):
            where = f"{self.path(key)}[{index}]"
            if not isinstance(item, str):
                raise self.error_at(where, f"expected a string, got {_type_name(item)}")
            items.append(item)
        return tuple(items)

    def model_names(self, key: str, *, non_empty: bool = False) -> tuple[str, ...] | None:
        names = self.strings(key, non_empty=non_empty)
        if names is None:
            return None
        for index, name in enumerate(names):
            where = f"{self.path(key)}[{index}]"
            if not name or len(name) > 256 or any(c.isspace() or not c.isprintable()
                                                   for c in name):
                raise self.error_at(
                    where, f"invalid model name {name!r} (1-256 printable characters, no spaces)"
                )
            if name in names[:index]:
                raise self.error_at(where, f"model {name!r} is listed twice")
        return names


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _parse_breaker(table: _Table | None, base: BreakerSettings) -> BreakerSettings:
    """A ``[breaker]`` table (global or per backend) over ``base``."""
    if table is None:
        return base
    table.check_keys(_BREAKER_KEYS)
    return _override(base, {
        "failure_threshold": table.integer("failure_threshold", 1),
        "reset_timeout": table.seconds("reset_timeout"),
        "success_threshold": table.integer("success_threshold", 1),
        "half_open_max": table.integer("half_open_max", 1),
        "enabled": table.boolean("enabled"),
    })


def _parse_local_defaults(table: _Table | None, base: LocalDefaults) -> LocalDefaults:
    """The ``[local]`` table over the environment's defaults."""
    if table is None:
        return base
    table.check_keys(_LOCAL_DEFAULT_KEYS)
    return _override(base, {
        "port_base": table.integer("port_base", 1, 65535),
        "ctx": table.integer("ctx", 0),
        "ngl": table.integer("ngl", 0),
        "threads": table.integer("threads", 0),
        "parallel": table.integer("parallel", 0),
    })


def _override(base: _D, values: Mapping[str, Any]) -> _D:
    """``base`` with the values the file gave (None: not given, keep the base's)."""
    return dataclasses.replace(base, **{k: v for k, v in values.items() if v is not None})


def _parse_base_url(table: _Table) -> str:
    raw = table.string("base_url")
    assert raw is not None
    value = raw.strip().rstrip("/")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or any(c.isspace() for c in value)
    ):
        raise table.error("base_url", f"expected an http(s) URL, got {raw!r}")
    if parts.username is not None or parts.password is not None:
        raise table.error(
            "base_url", "must not contain credentials (put the key in the variable api_key_env "
            "names)"
        )
    return value


class _ParsedBackend(NamedTuple):
    spec: BackendSpec
    explicit_port: bool


def _parse_backend(
    table: _Table,
    environ: Mapping[str, str],
    breaker_defaults: BreakerSettings,
    local: LocalDefaults,
    is_file: Callable[[str], bool],
    base_dir: str | None,
) -> _ParsedBackend:
    table.check_keys(_COMMON_KEYS + _LOCAL_KEYS + _REMOTE_KEYS)
    is_local, is_remote = table.has("model_path"), table.has("base_url")
    if is_local and is_remote:
        raise table.error_at(
            table.where, "has both model_path (a local child) and base_url (a remote upstream); "
            "choose one"
        )
    if not is_local and not is_remote:
        raise table.error_at(
            table.where, "needs model_path (a local child) or base_url (a remote upstream)"
        )
    wrong, kind = (_REMOTE_KEYS, "remote backends (with base_url)") if is_local else (
        _LOCAL_KEYS, "local backends (with model_path)")
    for key in table.data:
        if key in wrong:
            raise table.error(key, f"only for {kind}")

    models = table.model_names("models", non_empty=True)
    if models is None:
        raise table.error("models", "missing: list the model names this backend serves")
    name = table.string("name")
    if name is None:
        if not _BACKEND_NAME.fullmatch(models[0]):
            raise table.error(
                "name", f"missing, and the first model {models[0]!r} is not a valid backend "
                "name: set name"
            )
        name = models[0]
    elif not _BACKEND_NAME.fullmatch(name):
        raise table.error(
            "name", f"invalid backend name {name!r} (1-64 letters, digits, '.', '_', '-')"
        )
    upstream_models: tuple[tuple[str, str], ...] = ()
    mapping = table.table("upstream_models")
    if mapping is not None:
        pairs = []
        for model, upstream in mapping.data.items():
            if model not in models:
                raise mapping.error(model, f"{model!r} is not in this backend's models")
            if not isinstance(upstream, str) or not upstream.strip():
                raise mapping.error(model, "expected a non-empty string")
            pairs.append((model, upstream))
        upstream_models = tuple(pairs)
    common: dict[str, Any] = {
        "name": name,
        "models": models,
        "priority": _default(table.integer("priority"), 0),
        "weight": _default(table.integer("weight", 1, 1000), 1),
        "slots": table.integer("slots", 1),
        "breaker": _parse_breaker(table.table("breaker"), breaker_defaults),
        "timeouts": Timeouts(
            table.seconds("connect_timeout"),
            table.seconds("first_byte_timeout"),
            table.seconds("request_timeout"),
        ),
        "upstream_models": upstream_models,
    }
    if is_remote:
        return _ParsedBackend(_parse_remote(table, environ, common), False)
    model_path = table.string("model_path")
    assert model_path is not None
    model_path = os.path.expanduser(model_path)
    if base_dir is not None and not os.path.isabs(model_path):
        model_path = os.path.join(base_dir, model_path)
    if not is_file(model_path):
        raise table.error("model_path", f"model file not found: {model_path}")
    port = table.integer("port", 1, 65535)
    if port is not None and port in local.reserved_ports:
        raise table.error("port", f"port {port} is used by the gateway itself")
    extra_args = _default(table.strings("extra_args"), ())
    spec = LocalBackendSpec(
        model_path=model_path,
        port=port or 0,
        ctx=_default(table.integer("ctx", 0), local.ctx),
        ngl=_default(table.integer("ngl", 0), local.ngl),
        threads=_default(table.integer("threads", 0), local.threads),
        parallel=_default(table.integer("parallel", 0), local.parallel),
        extra_args=extra_args,
        child_env=_child_env(table),
        **_on_demand(table),
        **common,
    )
    return _ParsedBackend(spec, port is not None)


def _on_demand(table: _Table) -> dict[str, Any]:
    """``start``, ``idle_ttl`` and ``group`` of a local backend (the group is checked later)."""
    text = table.string("start")
    start = Start.ALWAYS
    if text is not None:
        try:
            start = Start(text)
        except ValueError:
            raise table.error(
                "start", f"expected \"always\" or \"on_demand\", got {text!r}") from None
    idle_ttl = 0.0
    if table.has("idle_ttl"):
        value = table.data["idle_ttl"]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise table.error("idle_ttl", f"expected a number of seconds, got {_type_name(value)}")
        if not math.isfinite(value) or value < 0:
            raise table.error("idle_ttl", f"expected a number of seconds >= 0, got {value}")
        idle_ttl = float(value)
    group = table.string("group")
    if start is Start.ALWAYS:
        for key in ("idle_ttl", "group"):
            if table.has(key):
                raise table.error(key, "only for start = \"on_demand\" backends")
    return {"start": start, "idle_ttl": idle_ttl, "group": group}


def _parse_groups(raw: object, backends: Sequence[BackendSpec], source: str
                  ) -> tuple[GroupSpec, ...]:
    """The ``[[groups]]`` array, checked against the backends that name a group."""
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise BackendsFileError(f"{source}: groups: expected an array of tables ([[groups]])")
    groups: dict[str, GroupSpec] = {}
    members = {spec.name: spec for spec in backends if isinstance(spec, LocalBackendSpec)}
    for index, item in enumerate(raw):
        table = _Table(item, f"groups[{index}]", source)
        table.check_keys(_GROUP_KEYS)
        name = table.string("name")
        if name is None:
            raise table.error("name", "missing: name the group")
        if not _BACKEND_NAME.fullmatch(name):
            raise table.error(
                "name", f"invalid group name {name!r} (1-64 letters, digits, '.', '_', '-')")
        if name in groups:
            raise table.error("name", f"duplicate group name {name!r}")
        max_running = _default(table.integer("max_running", 0, 1000), 0)
        preload = _default(table.strings("preload"), ())
        for position, backend in enumerate(preload):
            where = f"{table.path('preload')}[{position}]"
            spec = members.get(backend)
            if spec is None or spec.group != name:
                raise table.error_at(where, f"{backend!r} is not a backend of group {name!r}")
            if backend in preload[:position]:
                raise table.error_at(where, f"{backend!r} is listed twice")
        if max_running and len(preload) > max_running:
            raise table.error(
                "preload", f"{len(preload)} backends preloaded but max_running is {max_running}")
        groups[name] = GroupSpec(
            name=name,
            max_running=max_running,
            swap_grace=_default(table.seconds("swap_grace"), DEFAULT_SWAP_GRACE),
            swap_batch=_default(table.integer("swap_batch", 1, 1_000_000), DEFAULT_SWAP_BATCH),
            preload=preload,
            swap_wait=_default(table.seconds("swap_wait"), DEFAULT_SWAP_WAIT),
        )
    for index, backend_spec in enumerate(backends):
        group = backend_spec.group if isinstance(backend_spec, LocalBackendSpec) else None
        if group is not None and group not in groups:
            raise BackendsFileError(
                f"{source}: backends[{index}].group: no [[groups]] is called {group!r}")
    return tuple(groups.values())


def _child_env(table: _Table) -> tuple[tuple[str, str], ...]:
    """``child_env = { NAME = "value", … }``: variables the operator gives the child."""
    env = table.table("child_env")
    if env is None:
        return ()
    pairs: list[tuple[str, str]] = []
    for name, value in env.data.items():
        if not _ENV_NAME.fullmatch(name):
            raise env.error(name, f"{name!r} is not an environment variable name")
        if name == "LLAMA_API_KEY" or name.startswith("LLAMA_ARG_"):
            raise env.error(name, "llama-server settings belong in extra_args; a child never "
                            "gets LLAMA_API_KEY or LLAMA_ARG_* variables")
        if not isinstance(value, str):
            raise env.error(name, f"expected a string, got {_type_name(value)}")
        if "\0" in value:
            raise env.error(name, "must not contain a NUL character")
        pairs.append((name, value))
    return tuple(pairs)


def _parse_remote(
    table: _Table, environ: Mapping[str, str], common: dict[str, Any]
) -> RemoteBackendSpec:
    base_url = _parse_base_url(table)
    api_key_env = table.string("api_key_env")
    api_key = None
    if api_key_env is not None:
        if not _ENV_NAME.fullmatch(api_key_env):
            raise table.error("api_key_env", f"{api_key_env!r} is not an environment variable name")
        if api_key_env not in environ:
            raise table.error(
                "api_key_env", f"environment variable {api_key_env} is not set"
            )
        api_key = environ[api_key_env].strip()
        if not api_key:
            raise table.error("api_key_env", f"environment variable {api_key_env} is empty")
    return RemoteBackendSpec(
        base_url=base_url,
        api_key_env=api_key_env,
        api_key=api_key,
        verify_tls=_default(table.boolean("verify_tls"), True),
        retry_non_idempotent=_default(table.boolean("retry_non_idempotent"), False),
        **common,
    )


def _default(value: _T | None, default: _T) -> _T:
    return default if value is None else value


def _assign_ports(
    parsed: list[_ParsedBackend], local: LocalDefaults, source: str
) -> tuple[BackendSpec, ...]:
    used: dict[int, str] = {}
    for index, item in enumerate(parsed):
        spec = item.spec
        if isinstance(spec, LocalBackendSpec) and item.explicit_port:
            if spec.port in used:
                raise BackendsFileError(
                    f"{source}: backends[{index}].port: port {spec.port} is also used by "
                    f"backend {used[spec.port]!r}"
                )
            used[spec.port] = spec.name
    result: list[BackendSpec] = []
    next_port = local.port_base
    for index, item in enumerate(parsed):
        spec = item.spec
        if isinstance(spec, LocalBackendSpec) and not item.explicit_port:
            while next_port in used or next_port in local.reserved_ports:
                next_port += 1
            if next_port > 65535:
                raise BackendsFileError(
                    f"{source}: backends[{index}].port: no free port from port_base "
                    f"{local.port_base} up: set port"
                )
            spec = dataclasses.replace(spec, port=next_port)
            used[next_port] = spec.name
        result.append(spec)
    return tuple(result)


def parse_backends(
    data: Mapping[str, Any],
    source: str,
    environ: Mapping[str, str],
    *,
    defaults: LocalDefaults | None = None,
    is_file: Callable[[str], bool] = os.path.isfile,
    base_dir: str | None = None,
) -> BackendsTable:
    """Validate the parsed TOML document ``data`` (see ``load_backends_file``)."""
    top = _Table(dict(data), "", source)
    for key in top.data:
        if key not in _TOP_KEYS:
            raise BackendsFileError(
                f"{source}: {_key_path('', key)}: unknown key (expected one of: "
                f"{', '.join(_TOP_KEYS)})"
            )
    breaker = _parse_breaker(top.table("breaker"), BreakerSettings())
    local = _parse_local_defaults(top.table("local"), defaults or LocalDefaults())
    failover_table = top.table("failover")
    failover = FailoverSettings()
    if failover_table is not None:
        failover_table.check_keys(("max_attempts",))
        failover = FailoverSettings(
            _default(failover_table.integer("max_attempts", 1, 100), failover.max_attempts)
        )

    affinity = _parse_affinity(top.table("affinity"))

    raw_backends = top.data.get("backends")
    if raw_backends is None:
        raise BackendsFileError(f"{source}: backends: missing: declare at least one [[backends]]")
    if not isinstance(raw_backends, list) or not raw_backends:
        raise BackendsFileError(
            f"{source}: backends: expected a non-empty array of tables ([[backends]])"
        )
    parsed: list[_ParsedBackend] = []
    names: dict[str, int] = {}
    for index, raw in enumerate(raw_backends):
        table = _Table(raw, f"backends[{index}]", source)
        item = _parse_backend(table, environ, breaker, local, is_file, base_dir)
        if item.spec.name in names:
            raise table.error(
                "name", f"duplicate backend name {item.spec.name!r} (also backends["
                f"{names[item.spec.name]}]): give each backend a distinct name"
            )
        names[item.spec.name] = index
        parsed.append(item)
    backends = _assign_ports(parsed, local, source)
    groups = _parse_groups(top.data.get("groups"), backends, source)

    served: list[str] = []
    for spec in backends:
        served.extend(m for m in spec.models if m not in served)
    models = _parse_models(top.table("models"), served)
    defaults_declared = [m.name for m in models if m.default]
    draft = BackendsTable(
        backends=backends,
        models=models,
        default_model=defaults_declared[0] if defaults_declared else served[0],
        breaker=breaker,
        failover=failover,
        source=source,
        affinity=affinity,
        groups=groups,
    )
    key_models = _parse_keys(top.table("keys"), draft)
    return dataclasses.replace(draft, key_models=key_models)


def _parse_affinity(table: _Table | None) -> AffinitySettings:
    base = AffinitySettings()
    if table is None:
        return base
    table.check_keys(_AFFINITY_KEYS)
    load_factor = base.load_factor
    if table.has("load_factor"):
        value = table.data["load_factor"]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise table.error("load_factor", f"expected a number, got {_type_name(value)}")
        if not math.isfinite(value) or not 1 <= value <= 100:
            raise table.error("load_factor", f"expected a number from 1 to 100, got {value}")
        load_factor = float(value)
    return AffinitySettings(
        prefix_chars=_default(table.integer("prefix_chars", 1, 1 << 20), base.prefix_chars),
        prefix_messages=_default(table.integer("prefix_messages", 1, 10000),
                                 base.prefix_messages),
        min_prompt_chars=_default(table.integer("min_prompt_chars", 0, 1 << 30),
                                  base.min_prompt_chars),
        load_factor=load_factor,
        remembered=_default(table.integer("remembered", 0, 10_000_000), base.remembered),
        pin_slot=_default(table.boolean("pin_slot"), base.pin_slot),
    )


def _parse_models(table: _Table | None, served: list[str]) -> tuple[ModelSpec, ...]:
    declared: dict[str, ModelSpec] = {}
    alias_owner: dict[str, str] = {}
    default_owner: str | None = None
    if table is not None:
        for name in table.data:
            sub = table.table(name)
            assert sub is not None
            if name not in served:
                raise table.error(
                    name, f"no backend serves model {name!r} (add it to a backend's models)"
                )
            sub.check_keys(_MODEL_KEYS)
            strategy_text = sub.string("strategy")
            strategy = Strategy.PRIORITY
            if strategy_text is not None:
                try:
                    strategy = Strategy(strategy_text)
                except ValueError:
                    choices = ", ".join(s.value for s in Strategy)
                    raise sub.error(
                        "strategy", f"unknown strategy {strategy_text!r} (expected one of: "
                        f"{choices})"
                    ) from None
            aliases = _default(sub.model_names("aliases"), ())
            for index, alias in enumerate(aliases):
                where = f"{sub.path('aliases')}[{index}]"
                if alias in served:
                    raise sub.error_at(where, f"{alias!r} is already a model name")
                if alias in alias_owner:
                    raise sub.error_at(
                        where, f"alias {alias!r} is already an alias of {alias_owner[alias]!r}"
                    )
                alias_owner[alias] = name
            default = _default(sub.boolean("default"), False)
            if default:
                if default_owner is not None:
                    raise sub.error(
                        "default", f"model {default_owner!r} is already the default model"
                    )
                default_owner = name
            pin_slot = sub.boolean("pin_slot")
            if pin_slot is not None and strategy is not Strategy.CACHE_AFFINITY:
                raise sub.error("pin_slot", "applies to strategy \"cache_affinity\" only")
            declared[name] = ModelSpec(name, strategy, aliases, default, pin_slot)
    return tuple(declared.get(name, ModelSpec(name)) for name in served)


def _parse_keys(table: _Table | None, routing: BackendsTable) -> dict[str, frozenset[str]]:
    if table is None:
        return {}
    result: dict[str, frozenset[str]] = {}
    for key_id in table.data:
        if not _KEY_ID.fullmatch(key_id):
            raise table.error(key_id, "invalid key id (letters, digits, - and _)")
        sub = table.table(key_id)
        assert sub is not None
        sub.check_keys(("models",))
        names = sub.strings("models")
        if names is None:
            raise sub.error("models", "missing: list the models this key may use")
        allowed = set()
        for index, name in enumerate(names):
            canonical = routing.lookup(name)
            if canonical is None:
                raise sub.error_at(f"{sub.path('models')}[{index}]", f"unknown model {name!r}")
            allowed.add(canonical)
        result[key_id] = frozenset(allowed)
    return result
