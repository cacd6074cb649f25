"""One frozen, validated Config built from command-line flags, environment variables and defaults.

Every option is declared once in ``SETTINGS``: its flag, its environment variables (the older
gateway's names stay valid), its default, its strict parser and its help text. ``tap.Options``
builds the twistd flags from the same table, and a test checks that docs/configuration.md has a
line for each. Precedence: flag > first set environment variable > default. A value that does not
parse is a ``ConfigError`` naming the flag or variable; it is never replaced by a default.

Its size is the option table: every option's flag, variables, default, parser and help in one list,
which the docs and ``--help`` are generated from.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from llamaproxy.state.url import StateURL, parse_failure_mode, parse_state_url

log = Logger()

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


class ConfigError(ValueError):
    """A configuration value is missing, malformed or inconsistent; the message names its source."""


def parse_bool(text: str) -> bool:
    """Parse true/false/1/0/yes/no/on/off, case-insensitively; anything else is an error."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected one of true/false/1/0/yes/no/on/off, got {text!r}")


def _int_parser(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        stripped = text.strip()
        if not re.fullmatch(r"[+-]?\d+", stripped):
            raise ValueError(f"expected an integer, got {text!r}")
        value = int(stripped)
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"expected an integer {bound}, got {value}")
        return value

    return parse


def _float_parser(minimum: float, exclusive: bool = True) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(f"expected a number of seconds, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number, got {text!r}")
        if value < minimum or (exclusive and value == minimum):
            comparison = ">" if exclusive else ">="
            raise ValueError(f"expected a number {comparison} {minimum}, got {value}")
        return value

    return parse


def _text(text: str) -> str:
    return text.strip()


def _words(text: str) -> tuple[str, ...]:
    """Split a list given as one string: commas and/or whitespace separate the items."""
    return tuple(item for item in re.split(r"[\s,]+", text.strip()) if item)


def _networks(text: str) -> tuple[str, ...]:
    """A list of CIDRs or addresses (each checked), as given."""
    import ipaddress

    items = _words(text)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
    return items


def _shell_words(text: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(text))
    except ValueError as e:
        raise ValueError(f"cannot split into arguments: {e}") from None


def _url(text: str) -> str:
    value = text.strip().rstrip("/")
    if not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", value):
        raise ValueError(f"expected an http:// or https:// URL, got {text!r}")
    return value


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError(f"expected 'text' or 'json', got {text!r}")
    return value


#: Log levels, lowest first (``twisted.logger.LogLevel`` names).
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


def _log_level(text: str) -> str:
    value = text.strip().lower()
    value = "warn" if value == "warning" else value
    if value not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return value


def _optional_format(text: str) -> str:
    return _log_format(text) if text.strip() else ""


def _endpoint(text: str) -> str:
    """A twisted server endpoint string (tcp:, ssl:, unix:, ...) or empty (off)."""
    value = text.strip()
    if value and not re.fullmatch(r"[a-z][a-z0-9]*:\S+", value):
        raise ValueError(f"expected an endpoint string such as tcp:8002:interface=127.0.0.1, "
                         f"got {text!r}")
    return value


def _choice(*choices: str) -> Callable[[str], str]:
    """A parser accepting one of ``choices`` (case-insensitive), nothing else."""

    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"expected {' or '.join(choices)}, got {text!r}")
        return value

    return parse


def _tls_version(text: str) -> str:
    value = text.strip()
    if value not in ("1.2", "1.3"):
        raise ValueError(f"expected 1.2 or 1.3, got {text!r}")
    return value


def _key_limits(text: str) -> tuple[tuple[str, int], ...]:
    pairs = []
    for item in _words(text):
        key_id, sep, number = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+", key_id) or not number.isdigit():
            raise ValueError(f"expected key_id=N pairs, got {item!r}")
        pairs.append((key_id, int(number)))
    return tuple(pairs)


def _extra_path(text: str) -> tuple[str, ...]:
    allowed = {"/tokenize", "/detokenize", "/infill", "/rerank", "/v1/rerank"}
    paths = _words(text)
    unknown = sorted(set(paths) - allowed)
    if unknown:
        raise ValueError(
            f"unknown path(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    return paths


def _keys_store(text: str) -> str:
    value = text.strip().lower()
    if value not in ("file", "redis"):
        raise ValueError(f"expected 'file' or 'redis', got {text!r}")
    return value


_port = _int_parser(0, 65535)
_seconds = _float_parser(0.0)


@dataclass(frozen=True)
class Setting:
    """One configuration option: where it comes from, how it is parsed, what it means."""

    name: str
    flag: str
    env: tuple[str, ...]
    default: str | None
    parse: Callable[[str], Any]
    help: str
    repeatable: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("backends_file", "config", ("LLAMAPROXY_CONFIG",), None, _text,
            "TOML file declaring several backends (local children and remote upstreams), their "
            "models, strategies, failover and breakers; see docs/routing.md. Without it: one "
            "backend from MODEL_PATH or BACKEND_URL."),
    Setting("listen", "listen", ("LISTEN",), None, _words,
            "Gateway endpoint string, e.g. tcp:8000, ssl:8443:privateKey=k.pem:certKey=c.pem, "
            "unix:/run/llamaproxy.sock. Repeatable (the env var takes a comma/space separated "
            "list). Overrides --port and --host.", repeatable=True),
    Setting("host", "host", ("HOST",), "", _text,
            "Interface the default gateway and health listeners bind to (empty: all interfaces)."),
    Setting("port", "port", ("PORT", "GATEWAY_PORT"), "8000", _port,
            "Gateway port, used when no --listen is given."),
    Setting("listen_backlog", "listen-backlog", ("LISTEN_BACKLOG",), "511", _int_parser(1, 65535),
            "Connections the kernel holds for the gateway's listeners before they are accepted "
            "(PORT, and TLS on it; an --listen tcp/ssl string may say its own backlog=N). Past "
            "it, a burst of new connections waits for SYN retransmits (1 s, then 3 s); the "
            "kernel caps it at net.core.somaxconn."),
    Setting("health_port", "health-port", ("PORT_HEALTH",), "8001", _port,
            "Port of the health site for platform liveness checks (0 disables it)."),
    Setting("backend_port", "backend-port", ("PORT_BACKEND",), "8080", _port,
            "Port the supervised llama-server listens on (always bound to 127.0.0.1)."),
    Setting("backend_url", "backend-url", ("BACKEND_URL",), None, _url,
            "Proxy to an already running llama-server at this URL instead of spawning one."),
    Setting("backend_api_key", "backend-api-key", ("BACKEND_API_KEY",), None, _text,
            "API key sent to an external --backend-url server (a supervised child gets a fresh "
            "per-boot key instead)."),
    Setting("data_dir", "data-dir", ("DATA_DIR",), None, _text,
            "Data directory: default /data, else /runpod-volume, else /workspace when /data is "
            "absent."),
    Setting("model_path", "model", ("MODEL_PATH",), None, _text,
            "Path of the GGUF model llama-server loads."),
    Setting("model_name", "model-name", ("MODEL_NAME",), None, _text,
            "Model file name inside --models-dir, used when --model is not given."),
    Setting("models_dir", "models-dir", ("MODELS_DIR",), None, _text,
            "Directory holding models (default DATA_DIR/models)."),
    Setting("model_alias", "model-alias", ("MODEL_ALIAS",), None, _text,
            "Model id clients see in /v1/models and responses (default: the model file name "
            "without .gguf)."),
    Setting("llama_server", "llama-server", ("LLAMA_SERVER",), None, _text,
            "llama-server binary (default: llama-server on PATH, "
            "else the project's cached build)."),
    Setting("ngl", "ngl", ("NGL",), "99", _int_parser(0),
            "Layers to offload to the GPU (-ngl)."),
    Setting("ctx", "ctx", ("CTX",), "16384", _int_parser(0),
            "Total context size in tokens (-c), split across the --parallel slots."),
    Setting("threads", "threads", ("THREADS",), "0", _int_parser(0),
            "CPU threads (-t); 0 leaves llama-server's default."),
    Setting("parallel", "parallel", ("PARALLEL",), "0", _int_parser(0),
            "Server slots (--parallel); 0 leaves llama-server's default."),
    Setting("extra_args", "extra-args", ("EXTRA_ARGS",), "", _shell_words,
            "Extra llama-server arguments, shell-split and appended (can override --host: "
            "a warning is logged)."),
    Setting("ready_timeout", "ready-timeout", ("READY_TIMEOUT",), "600", _seconds,
            "Seconds a starting llama-server may take to load its model before it is restarted."),
    Setting("stop_timeout", "stop-timeout", ("STOP_TIMEOUT",), "30", _seconds,
            "Seconds between SIGTERM and SIGKILL when stopping llama-server."),
    Setting("backoff_max", "backoff-max", ("BACKOFF_MAX",), "60", _seconds,
            "Longest delay between restarts of a crashing llama-server (starts at 1 s, doubles)."),
    Setting("backoff_reset", "backoff-reset", ("BACKOFF_RESET",), "60", _seconds,
            "Seconds llama-server must stay ready before its restart delay resets to 1 s."),
    Setting("probe_interval", "probe-interval", ("PROBE_INTERVAL",), "5", _seconds,
            "Seconds between health probes of a ready backend (a loading one is probed faster)."),
    Setting("health_timeout", "health-timeout", ("HEALTH_TIMEOUT",), "2", _seconds,
            "Timeout of one backend health probe."),
    Setting("backend_connect_timeout", "backend-connect-timeout", ("BACKEND_CONNECT_TIMEOUT",),
            "10", _seconds, "Timeout for connecting to the backend (then 502)."),
    Setting("request_timeout", "request-timeout", ("REQUEST_TIMEOUT",), "300", _seconds,
            "Total time of one exchange with the backend (from sending the request to the end of "
            "the response): 504 if no response byte was sent yet, else the connection is "
            "aborted."),
    Setting("stream_idle_timeout", "stream-idle-timeout", ("STREAM_IDLE_TIMEOUT",), "120",
            _seconds, "Longest silence between two chunks of a backend response before it is "
            "aborted."),
    Setting("key_dir", "backend-key-dir", ("BACKEND_KEY_DIR",), None, _text,
            "Directory (created 0700) for the per-boot backend key file (default /dev/shm/"
            "llama-keys, else a temporary directory)."),
    Setting("instance_id", "instance-id", ("INSTANCE_ID",), None, _text,
            "Name of this instance in file names and logs (default: the host name; sanitised)."),
    Setting("auth_enabled", "auth-enabled", ("AUTH_ENABLED",), "true", parse_bool,
            "Require an API key on the API routes (true/false/1/0/yes/no/on/off)."),
    Setting("auth_keys_file", "auth-keys-file", ("AUTH_KEYS_FILE",), None, _text,
            "API key file, lines key_id:api_key[:rate_limit][:expiration] (default "
            "DATA_DIR/api_keys.txt)."),
    Setting("max_request_line_size", "max-request-line-size", ("MAX_REQUEST_LINE_SIZE",), "8192",
            _int_parser(64), "Longest request line in bytes, CRLF included (414 above it)."),
    Setting("max_header_line_size", "max-header-line-size", ("MAX_HEADER_LINE_SIZE",), "8192",
            _int_parser(64), "Longest header line in bytes, CRLF included (431 above it)."),
    Setting("max_headers", "max-headers", ("MAX_HEADERS",), "64", _int_parser(1),
            "Most header lines a request may have (431 above it)."),
    Setting("cors_origins", "cors-origins", ("CORS_ORIGINS",), "", _words,
            "Origins browsers may call from (comma separated, exact match, trailing / ignored), "
            "or * for any; empty disables CORS."),
    Setting("trusted_proxies", "trusted-proxies", ("TRUSTED_PROXIES",), "", _networks,
            "Proxies in front of the gateway whose X-Forwarded-For / Forwarded headers are "
            "believed (CIDRs or addresses, comma separated); empty: the TCP peer is the client. "
            "See docs/security.md."),
    Setting("max_requests_per_minute", "max-requests-per-minute", ("MAX_REQUESTS_PER_MINUTE",),
            "100", _int_parser(1), "Requests per key per sliding 60 s window, unless the key "
            "file gives the key its own limit (429 beyond it)."),
    Setting("admin_key_ids", "admin-key-ids", ("ADMIN_KEY_IDS",), "", _words,
            "Key ids allowed to call POST /reload, POST /v1/route and the /admin/models routes "
            "(models on demand), and to log in to the operator page (ADMIN_LISTEN; comma/space "
            "separated)."),
    Setting("keys_reload_interval", "keys-reload-interval", ("KEYS_RELOAD_INTERVAL",), "5",
            _seconds, "Seconds between checks of the key file for changes (reloaded when its "
            "content changed); on Linux inotify sees changes at once, this is the fallback."),
    Setting("max_request_body_size", "max-request-body-size", ("MAX_REQUEST_BODY_SIZE",),
            "10485760", _int_parser(1), "Largest request body in bytes (413 above it)."),
    Setting("fast_paths", "fast-paths", ("FAST_PATHS",), "auto", _choice("auto", "off"),
            "auto: the fast paths (llamaproxy/fastpath/) run when the startup contract check "
            "passes against the installed Twisted, else the stock Twisted path with one warning; "
            "off: always the stock Twisted path."),
    Setting("max_json_depth", "max-json-depth", ("MAX_JSON_DEPTH",), "64", _int_parser(1),
            "Deepest nesting of arrays and objects in a JSON request body (400 invalid_json "
            "beyond it)."),
    Setting("max_json_values", "max-json-values", ("MAX_JSON_VALUES",), "200000",
            _int_parser(1), "Most keys and values a JSON request body may hold (400 invalid_json "
            "beyond it): bounds the memory and CPU one body can cost."),
    Setting("max_queue_bytes", "max-queue-bytes", ("MAX_QUEUE_BYTES",), "268435456",
            _int_parser(0), "Most request-body bytes held at once by requests in progress "
            "(arriving, queued or being served); beyond it 503 queue_full. 0: no bound."),
    Setting("max_queue_bytes_per_key", "max-queue-bytes-per-key", ("MAX_QUEUE_BYTES_PER_KEY",),
            "67108864", _int_parser(0), "Most request-body bytes one key's requests in "
            "progress may hold; beyond it 503 queue_full. 0: no bound."),
    Setting("max_concurrent_requests", "max-concurrent-requests", ("MAX_CONCURRENT_REQUESTS",),
            "0", _int_parser(0), "Requests proxied at once (0: the backend's --parallel slot "
            "count, or 4 when that is unknown)."),
    Setting("max_queue_size", "max-queue-size", ("MAX_QUEUE_SIZE",), "0", _int_parser(0),
            "Requests allowed to wait for a slot (0: unlimited); beyond it 503 queue_full."),
    Setting("max_queue_per_key", "max-queue-per-key", ("MAX_QUEUE_PER_KEY",), "0", _int_parser(0),
            "Requests one key may have waiting (0: no per-key bound); beyond it 503 queue_full."),
    Setting("queue_timeout", "queue-timeout", ("QUEUE_TIMEOUT",), "60", _seconds,
            "Longest wait for a free slot, or for a restarting backend to be ready, before 503 "
            "queue_timeout with Retry-After."),
    Setting("load_timeout", "load-timeout", ("LOAD_TIMEOUT",), "300", _seconds,
            "Longest wait of a request for an on-demand model (start = \"on_demand\" in the "
            "backends file) to be started or swapped in, before 503 model_loading with "
            "Retry-After."),
    Setting("first_byte_timeout", "first-byte-timeout", ("FIRST_BYTE_TIMEOUT",), "300", _seconds,
            "Longest wait for the backend's response headers once a request was sent (then "
            "504)."),
    Setting("client_header_timeout", "client-header-timeout", ("CLIENT_HEADER_TIMEOUT",), "30",
            _seconds, "Seconds a client has, from its first byte, to send a whole request "
            "(headers and body); then 408 and the connection is closed."),
    Setting("proxy_extra_paths", "proxy-extra-paths", ("PROXY_EXTRA_PATHS",), "", _extra_path,
            "llama-server extras to expose besides the OpenAI paths: /tokenize, /detokenize, "
            "/infill, /rerank, /v1/rerank."),
    Setting("log_format", "log-format", ("LOG_FORMAT",), "text", _log_format,
            "Log format on twistd's log output: text, or json (one object per line: ts, level, "
            "msg, fields)."),
    Setting("log_level", "log-level", ("LOG_LEVEL",), "info", _log_level,
            "Lowest level written to the log: debug, info, warn, error or critical."),
    Setting("child_request_log_level", "child-request-log-level",
            ("CHILD_REQUEST_LOG_LEVEL",), "debug", _log_level,
            "Level of llama-server's per-request output lines (request:, slot …, timings); its "
            "other lines are info. At debug they are written only with LOG_LEVEL=debug."),
    Setting("worker_type", "worker-type", ("WORKER_TYPE",), "", _text,
            "A name for this worker's role, added to every log record (optional)."),
    Setting("access_log", "access-log", ("ACCESS_LOG",), "", _text,
            "Access log file, one line per request (default DATA_DIR/logs/api_access.log; - for "
            "stdout; off to disable)."),
    Setting("access_log_format", "access-log-format", ("ACCESS_LOG_FORMAT",), "", _optional_format,
            "Access log format: text or json (default: LOG_FORMAT)."),
    Setting("usage_ledger", "usage-ledger", ("USAGE_LEDGER",), "", _text,
            "SQLite file of token totals per key and day (default DATA_DIR/usage.sqlite3; off to "
            "disable)."),
    Setting("tokens_per_minute", "tokens-per-minute", ("TOKENS_PER_MINUTE",), "0", _int_parser(0),
            "Tokens (prompt + completion) per key per sliding minute; 0: no token limit."),
    Setting("key_tokens_per_minute", "key-tokens-per-minute", ("KEY_TOKENS_PER_MINUTE",), "",
            _key_limits, "Per-key token limits overriding TOKENS_PER_MINUTE, e.g. "
            "alice=50000,bob=0 (0: unlimited)."),
    Setting("metrics_auth_enabled", "metrics-auth-enabled", ("METRICS_AUTH_ENABLED",), "false",
            parse_bool, "Require an API key for /metrics on the gateway (it then includes "
            "per-key series)."),
    Setting("metrics_listen", "metrics-listen", ("METRICS_LISTEN",), "", _text,
            "Extra endpoint serving Prometheus metrics with per-key series, e.g. "
            "tcp:9100:interface=127.0.0.1 (empty: none)."),
    Setting("admin_listen", "admin-listen", ("ADMIN_LISTEN",), "", _endpoint,
            "Endpoint of the operator's web page (backends, activity, keys, child logs, live), "
            "e.g. tcp:8002:interface=127.0.0.1; login with a key listed in ADMIN_KEY_IDS "
            "(empty: off). See docs/operations.md."),
    Setting("admin_session_ttl", "admin-session-ttl", ("ADMIN_SESSION_TTL",), "3600", _seconds,
            "Seconds an operator page login lasts (a removed or rotated key ends it sooner)."),
    Setting("tls_cert_file", "tls-cert-file", ("TLS_CERT_FILE",), None, _text,
            "PEM certificate: with TLS_KEY_FILE, the gateway listener on PORT speaks HTTPS."),
    Setting("tls_key_file", "tls-key-file", ("TLS_KEY_FILE",), None, _text,
            "PEM private key for TLS_CERT_FILE."),
    Setting("tls_chain_file", "tls-chain-file", ("TLS_CHAIN_FILE",), None, _text,
            "PEM intermediate certificates (optional)."),
    Setting("tls_min_version", "tls-min-version", ("TLS_MIN_VERSION",), "1.2", _tls_version,
            "Lowest TLS version accepted: 1.2 or 1.3."),
    Setting("hsts_max_age", "hsts-max-age", ("HSTS_MAX_AGE",), "0", _int_parser(0),
            "Send Strict-Transport-Security with this max-age on HTTPS responses (0: no header)."),
    Setting("drain_timeout", "drain-timeout", ("DRAIN_TIMEOUT",), "30", _float_parser(0.0, False),
            "On SIGTERM, seconds in-flight requests may take to finish before they are cut."),
    Setting("state_url", "state-url", ("STATE_URL",), "", parse_state_url,
            "Redis shared by gateway replicas (redis://[[user]:password@]host[:port][/db], or "
            "rediss:// for TLS with certificate verification): request and token limits, usage "
            "counters and backend slots are then shared. Empty: all state stays in this process "
            "(docs/scaling.md)."),
    Setting("keys_store", "keys-store", ("KEYS_STORE",), "file", _keys_store,
            "Where API keys live: 'file' (AUTH_KEYS_FILE) or 'redis' (the STATE_URL Redis, "
            "managed with `llamaproxy keys --store`; replicas see changes within a second)."),
    Setting("state_failure", "state-failure", ("STATE_FAILURE",), "open", parse_failure_mode,
            "When Redis does not answer: 'open' keeps serving with this replica's own limits "
            "and slots (and logs it), 'closed' answers 503 with Retry-After."),
)

SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}

#: The older gateway's variables llamaproxy does not use, and what to do instead: setting one
#: logs a warning at startup instead of being silently ignored.
IGNORED_OLDER_VARIABLES = {
    "MOCK_BACKEND": "point BACKEND_URL at any running server instead",
    "BACKEND_HOST": "set BACKEND_URL for a backend elsewhere",
    "DEBUG_SHELL": "run a shell in the container instead",
    "LOG_DIR": "logs go to twistd's log (--logfile) and ACCESS_LOG",
    "LOG_NAME": "logs go to twistd's log (--logfile) and ACCESS_LOG",
}


@dataclass(frozen=True)
class Config:
    """The validated configuration of one llamaproxy process."""

    backends_file: str | None
    listen: tuple[str, ...]
    host: str
    port: int
    listen_backlog: int
    health_port: int
    backend_port: int
    backend_url: str | None
    backend_api_key: str | None
    data_dir: str
    model_path: str | None
    model_alias: str
    llama_server: str | None
    ngl: int
    ctx: int
    threads: int
    parallel: int
    extra_args: tuple[str, ...]
    ready_timeout: float
    stop_timeout: float
    backoff_max: float
    backoff_reset: float
    probe_interval: float
    health_timeout: float
    backend_connect_timeout: float
    request_timeout: float
    stream_idle_timeout: float
    key_dir: str | None
    instance_id: str
    auth_enabled: bool
    auth_keys_file: str
    max_request_line_size: int
    max_header_line_size: int
    max_headers: int
    cors_origins: tuple[str, ...]
    trusted_proxies: tuple[str, ...]
    max_requests_per_minute: int
    admin_key_ids: tuple[str, ...]
    keys_reload_interval: float
    max_request_body_size: int
    fast_paths: str
    max_json_depth: int
    max_json_values: int
    max_queue_bytes: int
    max_queue_bytes_per_key: int
    max_concurrent_requests: int
    max_queue_size: int
    max_queue_per_key: int
    queue_timeout: float
    load_timeout: float
    first_byte_timeout: float
    client_header_timeout: float
    proxy_extra_paths: tuple[str, ...]
    log_format: str
    log_level: str
    child_request_log_level: str
    worker_type: str
    access_log: str
    access_log_format: str
    usage_ledger: str
    tokens_per_minute: int
    key_tokens_per_minute: tuple[tuple[str, int], ...]
    metrics_auth_enabled: bool
    metrics_listen: str
    admin_listen: str
    admin_session_ttl: float
    tls_cert_file: str | None
    tls_key_file: str | None
    tls_chain_file: str | None
    tls_min_version: str
    hsts_max_age: int
    drain_timeout: float
    state_url: StateURL | None = None
    keys_store: str = "file"
    state_failure: str = "open"
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def supervised(self) -> bool:
        """True when this process spawns and supervises its own llama-server."""
        return self.backend_url is None

    @property
    def backend_base_url(self) -> str:
        """The URL requests are forwarded to."""
        if self.backend_url is not None:
            return self.backend_url
        return f"http://127.0.0.1:{self.backend_port}"

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Gateway endpoint strings: --listen, else tcp:PORT on HOST."""
        if self.listen:
            return self.listen
        return (_tcp_endpoint(self.port, self.host) + f":backlog={self.listen_backlog}",)

    @property
    def health_endpoint(self) -> str | None:
        """Endpoint string of the health site, or None when it is disabled."""
        if self.health_port == 0:
            return None
        return _tcp_endpoint(self.health_port, self.host)


def _tcp_endpoint(port: int, host: str) -> str:
    if not host:
        return f"tcp:{port}"
    return f"tcp:{port}:interface={host.replace(':', chr(92) + ':')}"


def detect_data_dir(exists: Callable[[str], bool] = os.path.isdir) -> str:
    """The older gateway's platform detection: /data, else /runpod-volume, else /workspace."""
    if exists("/data"):
        return "/data"
    for candidate in ("/runpod-volume", "/workspace"):
        if exists(candidate):
            return candidate
    return "/data"


def data_file_from_env(
    environ: Mapping[str, str],
    variable: str,
    name: str,
    data_dir_exists: Callable[[str], bool] = os.path.isdir,
) -> str:
    """``$variable`` when set, else ``$DATA_DIR/name`` (DATA_DIR detected as the gateway does):
    where the command-line tools find the gateway's files without the gateway's flags."""
    explicit = environ.get(variable, "").strip()
    if explicit:
        return explicit
    data_dir = environ.get("DATA_DIR", "").strip() or detect_data_dir(data_dir_exists)
    return os.path.join(data_dir, name)


def sanitize_instance_id(value: str) -> str:
    """Make a value safe inside a file name (SEC-06 of the older gateway)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", value)[:64].lstrip(".")
    return cleaned or "unknown"


def _raw_values(
    flags: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, tuple[str, Any]], list[str]]:
    """Pick each setting's raw text and the name of where it came from."""
    chosen: dict[str, tuple[str, Any]] = {}
    warnings: list[str] = []
    for setting in SETTINGS:
        flag_value = flags.get(setting.name)
        if setting.repeatable and flag_value:
            chosen[setting.name] = (f"--{setting.flag}", list(flag_value))
            continue
        if flag_value is not None and not setting.repeatable:
            chosen[setting.name] = (f"--{setting.flag}", flag_value)
            continue
        for var in setting.env:
            if var in environ:
                chosen[setting.name] = (var, environ[var])
                break
    if "backend_port" not in chosen and "BACKEND_PORT" in environ:
        chosen["backend_port"] = ("BACKEND_PORT", environ["BACKEND_PORT"])
        warnings.append("BACKEND_PORT is deprecated: set PORT_BACKEND instead")
    for var, hint in IGNORED_OLDER_VARIABLES.items():
        if var in environ:
            warnings.append(f"{var} is not used by llamaproxy and is ignored: {hint}")
    return chosen, warnings


def _parse_one(setting: Setting, source: str, raw: Any) -> Any:
    try:
        if setting.repeatable and isinstance(raw, list):
            return tuple(item for text in raw for item in setting.parse(text))
        return setting.parse(raw)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    path_exists: Callable[[str], bool] = os.path.isdir,
    hostname: Callable[[], str] = socket.gethostname,
) -> Config:
    """Build and validate the Config; raise ConfigError naming the offending flag or variable."""
    chosen, warnings = _raw_values(flags, environ)
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.name in chosen:
            source, raw = chosen[setting.name]
            values[setting.name] = _parse_one(setting, source, raw)
        elif setting.default is not None:
            values[setting.name] = setting.parse(setting.default)
        else:
            values[setting.name] = () if setting.repeatable else None

    data_dir = values["data_dir"] or detect_data_dir(path_exists)
    models_dir = values.pop("models_dir") or os.path.join(data_dir, "models")
    model_name = values.pop("model_name")
    model_path = values["model_path"]
    if not model_path and model_name:
        model_path = os.path.join(models_dir, model_name)

    if values["backend_url"] is None and values["backends_file"] is None:
        if not model_path:
            raise ConfigError(
                "no model: set MODEL_PATH (--model), or MODEL_NAME inside MODELS_DIR, "
                "or BACKEND_URL to use a running llama-server"
            )
        _check_model(model_path)
        if values["extra_args"]:
            warnings.append(
                "EXTRA_ARGS is set and is appended after llamaproxy's own arguments: it can "
                "override --host and expose llama-server beyond 127.0.0.1"
            )
        if values["backend_port"] == 0:
            raise ConfigError("PORT_BACKEND: a supervised llama-server needs a fixed port, not 0")
    if values["keys_store"] == "redis" and values["state_url"] is None:
        raise ConfigError("KEYS_STORE=redis needs STATE_URL (the Redis that holds the keys)")
    if bool(values["tls_cert_file"]) != bool(values["tls_key_file"]):
        raise ConfigError("TLS_CERT_FILE and TLS_KEY_FILE must be set together")
    if values["admin_listen"]:
        if not values["auth_enabled"]:
            raise ConfigError(
                "ADMIN_LISTEN: the operator page needs AUTH_ENABLED=true (its login takes an "
                "admin key)"
            )
        if not values["admin_key_ids"]:
            raise ConfigError(
                "ADMIN_LISTEN: set ADMIN_KEY_IDS too (only those keys may log in to the page)"
            )
    if not values["access_log_format"]:
        values["access_log_format"] = values["log_format"]
    alias = values["model_alias"] or (
        Path(model_path).name.removesuffix(".gguf") if model_path else "default"
    )
    values.update(
        data_dir=data_dir,
        model_path=model_path,
        model_alias=alias,
        instance_id=sanitize_instance_id(values["instance_id"] or hostname() or "unknown"),
        auth_keys_file=values["auth_keys_file"] or os.path.join(data_dir, "api_keys.txt"),
        warnings=tuple(warnings),
    )
    return Config(**values)


def _check_model(path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"model file not found: {path} (MODEL_PATH / MODELS_DIR/MODEL_NAME)")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"model file is not readable: {path}")


def documented_names(settings: Sequence[Setting] = SETTINGS) -> list[str]:
    """Every flag and environment variable name, for the documentation check."""
    names = []
    for s in settings:
        names.append(f"--{s.flag}")
        names.extend(s.env)
    return names
