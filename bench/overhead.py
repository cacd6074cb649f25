"""What a proxy adds: the fake backend directly, behind nginx, the older gateway and llamaproxy.

The servers side by side, same load, same machine:

- ``direct``: :mod:`bench.fake_backend` (raw asyncio, never the bottleneck);
- ``nginx``: one worker, ``proxy_buffering off``, upstream keep-alive (:mod:`bench.nginx`;
  skipped with a note when nginx is not installed);
- ``llamaproxy``: ``twistd -n llamaproxy`` with ``BACKEND_URL`` on the fake, every feature on:
  auth with a key, rate limit (set high), access log, JSON logs, metrics and usage ledger when the
  build has them (unknown variables only produce a startup warning); twice, with
  ``FAST_PATHS=auto`` (``llamaproxy``) and ``FAST_PATHS=off`` (``llamaproxy-off``);
- ``older``: the older stdlib gateway (``scripts/gateway.py`` of zepfu/llama-gguf-inference, auth
  on with a one-key file), run from an export given with ``--older-gateway PATH`` or
  ``BENCH_OLDER_GATEWAY`` (:mod:`bench.older_gateway`; never copied into this project); skipped
  with a note when not given;
- ``floor``: :file:`bench/floor_relay.py`, a raw-epoll relay in Python with no feature and no
  HTTP parsing (``--no-floor`` skips it). It is judged by the same goals: one it does not meet
  on a host is out of reach of any Python gateway there.

Proxies run on core 0 (``taskset -c 0``); the backend and the load generators on core 1.
Measurements: plain (non-streamed) chat requests with ``wrk`` and :file:`bench/wrk_post.lua` at
concurrency 1 and 64 (latency p50/p99, requests/s, proxy CPU-seconds per 1 000 requests from
/proc/<pid>/stat and how much of it was the kernel's, RSS), then 500 concurrent SSE streams of
50 events 20 ms apart with :mod:`bench.load`, after one unmeasured round that fills the proxy's
upstream pool (first-byte latency, gaps between events, delivery delay, arrival spread, proxy CPU
and RSS), and last, for each llamaproxy variant, the RSS that 10 000 queued requests add
(:mod:`bench.queue_rss`).
"Added" numbers are proxy minus direct. Issue 18's goals are then computed as ratios to the older
gateway and nginx of the same run (:mod:`bench.ratios`), each with met / not met. Output: markdown
tables (stdout and ``--markdown``) and the JSON document (``--json``).

    .venv/bin/python -m bench.overhead [--older-gateway PATH] [--smoke] [--json out.json]
                                       [--markdown out.md]

``--smoke`` runs the same thing small (a few seconds; no nginx or older gateway needed; a Python
load generator replaces wrk when it is absent) to record numbers in the CI log: the goals table
is printed for what was measured, and nothing is judged or asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import nginx, older_gateway, ratios
from bench.procs import (
    Process,
    cores,
    cpu_since,
    cpu_user_system,
    free_port,
    http_status,
    machine,
    machine_busy_percent,
    memory_kib,
    pinned,
    tree,
    venv_script,
    wait_quiet,
    wait_until,
)

API_KEY = "sk-bench-0123456789abcdef0123"
LUA = Path(__file__).with_name("wrk_post.lua")
PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Plan:
    """How much load, how long."""

    duration: float = 10.0
    warmup: float = 2.0
    concurrencies: tuple[int, ...] = (1, 64)
    streams: int = 500
    events: int = 50
    interval_ms: float = 20.0
    ramp: float = 0.5
    #: Measured rounds of streams per server; the round with the median first-byte p50 is shown.
    stream_rounds: int = 3
    #: Requests queued behind one busy slot for the memory figure (0: not measured).
    queued: int = 10_000
    #: The fake backend closes the connection after each stream, as llama-server does: no proxy
    #: can then reuse a backend connection for the next stream.
    backend_closes_after_streams: bool = False

    @classmethod
    def smoke(cls) -> Plan:
        """A few seconds in all."""
        return cls(duration=0.5, warmup=0.2, streams=50, events=10, interval_ms=20.0, ramp=0.1,
                   stream_rounds=1, queued=200)


#: The FAST_PATHS values llamaproxy is measured with; the server of each in the results.
VARIANTS = ratios.VARIANTS
#: Column titles of the servers, in table order.
TITLES = {"direct": "direct", "nginx": "nginx", "older": "older gateway",
          ratios.FLOOR: "floor relay", "llamaproxy": "llamaproxy (auto)",
          "llamaproxy-off": "llamaproxy (off)"}
FLOOR_RELAY = Path(__file__).with_name("floor_relay.py")


@dataclass
class Server:
    """One server under test."""

    name: str
    url: str
    process: Process
    api_key: str | None = None
    #: The run directory of its data and logs (llamaproxy), when it has one.
    root: Path | None = None

    def pids(self) -> list[int]:
        """Its processes (nginx: master and workers)."""
        return tree(self.process.pid)


def start_backend(root: Path, plan: Plan, core: int | None) -> Server:
    """The fake OpenAI backend, as its own process."""
    port = free_port()
    command = [sys.executable, "-m", "bench.fake_backend", "--port", str(port),
               "--events", str(plan.events), "--interval-ms", str(plan.interval_ms),
               "--lifetime", "3600"]
    if plan.backend_closes_after_streams:
        command.append("--close-after-stream")
    process = Process("fake backend", pinned(command, core), root / "backend.log",
                      cwd=Path(__file__).resolve().parent.parent)
    wait_until(lambda: http_status(port, "/health") == 200, 10, "the fake backend", process)
    return Server("direct", f"http://127.0.0.1:{port}", process)


def start_floor(root: Path, backend_url: str, core: int | None) -> Server:
    """``bench/floor_relay.py`` in front of ``backend_url``: no feature, one backend connection
    per client connection (wrk's keep-alive passes through it as bytes)."""
    port = free_port()
    command = [sys.executable, str(FLOOR_RELAY), str(port), backend_url.rsplit(":", 1)[1]]
    process = Process("floor relay", pinned(command, core), root / "floor.log")
    wait_until(lambda: http_status(port, "/health") == 200, 10, "the floor relay", process)
    return Server(ratios.FLOOR, f"http://127.0.0.1:{port}", process)


def gateway_env(root: Path, port: int, backend_url: str, fast_paths: str = "auto"
                ) -> dict[str, str]:
    """The llamaproxy environment: every feature on, limits out of the way."""
    keys = root / "api_keys.txt"
    keys.write_text(f"# bench\nbench:{API_KEY}\n")
    return {
        **os.environ,
        "BACKEND_URL": backend_url,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "PORT_HEALTH": "0",
        "DATA_DIR": str(root),
        "INSTANCE_ID": "bench",
        "AUTH_ENABLED": "true",
        "AUTH_KEYS_FILE": str(keys),
        "MAX_REQUESTS_PER_MINUTE": "1000000000",
        "MAX_CONCURRENT_REQUESTS": "1024",
        "MAX_QUEUE_SIZE": "0",
        "ACCESS_LOG": str(root / "access.log"),
        "LOG_FORMAT": "json",
        "METRICS_ENABLED": "true",
        "USAGE_LEDGER": str(root / "usage.sqlite3"),
        "FAST_PATHS": fast_paths,
    }


def start_gateway(root: Path, backend_url: str, core: int | None,
                  fast_paths: str = "auto") -> Server:
    """``twistd -n llamaproxy`` in front of ``backend_url`` (``FAST_PATHS=fast_paths``; other
    than ``auto``, its data and logs go to a directory of its own under ``root``)."""
    name = VARIANTS.get(fast_paths, f"llamaproxy-{fast_paths}")
    if fast_paths != "auto":
        root = root / name
        root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [venv_script("twistd"), "-n", "--pidfile=", "--logfile", str(root / "twistd.log"),
               "llamaproxy"]
    process = Process(name, pinned(command, core), root / "twistd.out",
                      env=gateway_env(root, port, backend_url, fast_paths), cwd=root)
    wait_until(lambda: http_status(port, "/readyz") == 200, 30, f"{name} /readyz", process)
    return Server(name, f"http://127.0.0.1:{port}", process, API_KEY, root)


def start_older(export: Path, root: Path, backend_url: str, core: int | None
                ) -> tuple[Server, older_gateway.DataDirectory]:
    """The older gateway (:mod:`bench.older_gateway`) in front of ``backend_url``."""
    backend_port = int(backend_url.rsplit(":", 1)[1])
    process, port, data = older_gateway.start(export, root / "older", backend_port, API_KEY,
                                               sys.executable, core)
    return Server("older", f"http://127.0.0.1:{port}", process, API_KEY, root / "older"), data


def older_features(server: Server, data: older_gateway.DataDirectory) -> dict[str, Any]:
    """What the older gateway really did: auth on (401 without a key), its access log."""
    port = int(server.url.rsplit(":", 1)[1])
    log = data.access_log
    return {
        "auth_without_key_status": http_status(port, PATH, 5.0, "POST", b"{}"),
        "access_log": str(log) if log is not None else None,
        "access_log_bytes": log.stat().st_size if log is not None and log.exists() else None,
        "startup_output": [line[:200] for line in server.process.log_path.read_text(
            errors="replace").splitlines()[:12]],
    }


def gateway_features(root: Path, server: Server) -> dict[str, Any]:
    """Which features were really on (checked, not assumed)."""
    root = server.root or root
    port = int(server.url.rsplit(":", 1)[1])
    log = ""
    for name in ("twistd.log", "twistd.out"):
        path = root / name
        if path.exists():
            log += path.read_text(errors="replace")
    warnings = [line.strip()[-200:] for line in log.splitlines()
                if "Configuration" in line or "not supported" in line.lower()]
    access_log = root / "access.log"
    return {
        "auth_without_key_status": http_status(port, PATH, 5.0, "POST", b"{}"),
        "metrics_status": http_status(port, "/metrics"),
        "access_log_bytes": access_log.stat().st_size if access_log.exists() else None,
        "usage_ledger": (root / "usage.sqlite3").exists(),
        "fast_paths": _health(port).get("fast_paths"),
        "startup_warnings": warnings[:10],
    }


def _health(port: int) -> dict[str, Any]:
    """The gateway's ``/health`` document ({} when it does not answer)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/health")
        document = json.loads(connection.getresponse().read())
        return document if isinstance(document, dict) else {}
    except (OSError, ValueError, http.client.HTTPException):
        return {}
    finally:
        connection.close()


# -- load -------------------------------------------------------------------------------------


def upstream_connections(backend_url: str) -> int | None:
    """Connections the fake backend has accepted so far (its ``GET /stats``)."""
    import http.client

    port = int(backend_url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/stats")
        return int(json.loads(connection.getresponse().read())["connections"])
    except (OSError, ValueError, KeyError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def _parse_wrk(output: str) -> dict[str, Any]:
    line = next((x for x in output.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{output[-2000:]}")
    raw = json.loads(line[len("WRK_JSON "):])
    duration = raw["duration_us"] / 1e6
    errors = sum(raw["errors"].values())
    latency = raw["latency_us"]
    return {
        "tool": "wrk",
        "requests": raw["requests"],
        "errors": errors,
        "errors_by_kind": raw["errors"],
        "duration_s": duration,
        "rps": (raw["requests"] - raw["errors"]["status"]) / duration,
        "latency_ms": {name: latency[name] / 1000 for name in ("min", "mean", "p50", "p99",
                                                                "max")},
    }


def plain_command(server: Server, concurrency: int, duration: float, core: int | None,
                  use_wrk: bool) -> list[str]:
    """The load generator's command line for one plain-request run."""
    if use_wrk:
        return pinned(["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s",
                       "-s", str(LUA), server.url + PATH], core)
    command = [sys.executable, "-m", "bench.load", "plain", "--url", server.url,
               "--connections", str(concurrency), "--duration", str(duration)]
    if server.api_key:
        command += ["--api-key", server.api_key]
    return pinned(command, core)


def run_plain(server: Server, concurrency: int, duration: float, core: int | None,
              use_wrk: bool, backend_url: str) -> dict[str, Any]:
    """One plain-request run, with the server's CPU and memory around it."""
    command = plain_command(server, concurrency, duration, core, use_wrk)
    env = {**os.environ, "BENCH_API_KEY": server.api_key or ""}
    pids = server.pids()
    opened = upstream_connections(backend_url)
    before = cpu_user_system(pids)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False,
                          timeout=duration + 60, cwd=Path(__file__).resolve().parent.parent)
    cpu, system = cpu_since(pids, before)
    after = upstream_connections(backend_url)
    if use_wrk:
        result = _parse_wrk(done.stdout)
    else:
        if done.returncode != 0:
            raise RuntimeError(f"load generator failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout)
    result.update(
        command=" ".join(command),
        cpu_s=cpu,
        cpu_s_per_1000=cpu / result["requests"] * 1000 if result["requests"] else None,
        cpu_percent=cpu / result["duration_s"] * 100,
        cpu_system_percent=system / result["duration_s"] * 100,
        rss_mb=memory_kib(pids) * 1024 / 1e6,
        upstream_connections_opened=(None if opened is None or after is None
                                     else after - opened - 1),  # - the /stats call itself
    )
    return result


def run_streams(server: Server, plan: Plan, core: int | None, backend_url: str) -> dict[str, Any]:
    """``plan.streams`` concurrent SSE streams through ``server``."""
    command = [sys.executable, "-m", "bench.load", "streams", "--url", server.url,
               "--streams", str(plan.streams), "--events", str(plan.events),
               "--ramp", str(plan.ramp)]
    if server.api_key:
        command += ["--api-key", server.api_key]
    command = pinned(command, core)
    pids = server.pids()
    opened = upstream_connections(backend_url)
    before = cpu_user_system(pids)
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    cpu, system = cpu_since(pids, before)
    after = upstream_connections(backend_url)
    if done.returncode != 0:
        raise RuntimeError(f"stream load failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    result.update(
        command=" ".join(command).replace(API_KEY, "$KEY"),
        cpu_s=cpu,
        cpu_system_s=system,
        cpu_percent=cpu / result["wall_s"] * 100 if result["wall_s"] else None,
        cpu_system_percent=system / result["wall_s"] * 100 if result["wall_s"] else None,
        cpu_ms_per_1000_events=(cpu * 1e6 / result["events_received"]
                                if result["events_received"] else None),
        rss_mb=memory_kib(pids) * 1024 / 1e6,
        peak_rss_mb=memory_kib(pids, "VmHWM") * 1024 / 1e6,
        upstream_connections_opened=(None if opened is None or after is None
                                     else after - opened - 1),  # - the /stats call itself
    )
    return result


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round whose first-byte p50 is the median, with every round's key numbers."""
    def key(result: dict[str, Any]) -> float:
        return _get(result, "first_byte_ms", "p50") or 0.0

    chosen = dict(sorted(rounds, key=key)[(len(rounds) - 1) // 2])
    chosen["rounds"] = [
        {"first_byte_p50_ms": _get(r, "first_byte_ms", "p50"),
         "gap_p99_ms": _get(r, "gap_ms", "p99"), "cpu_percent": r.get("cpu_percent")}
        for r in rounds
    ]
    return chosen


# -- report -----------------------------------------------------------------------------------


def _get(document: dict[str, Any] | None, *keys: str) -> float | None:
    value: Any = document
    for key in keys:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return float(value)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _cell(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    """The tables docs/performance.md includes."""
    names = [n for n in TITLES if n in results["plain"]]
    plain, streams = results["plain"], results["streams"]
    head = ("| | " + " | ".join(TITLES[n] for n in names) + " |\n|---|" + "---|" * len(names)
            + "\n")

    def row(label: str, get: Callable[[str], float | None], digits: int = 2,
            sign: bool = False) -> str:
        return f"| {label} | " + " | ".join(_cell(get(n), digits, sign) for n in names) + " |\n"

    def added_row(label: str, get: Callable[[str], float | None], digits: int = 2) -> str:
        return row(label, lambda n: None if n == "direct" else _minus(get(n), get("direct")),
                   digits, True)

    text = "Plain (non-streamed) chat requests, " + plain["tool"] + ":\n\n" + head
    for c in results["plan"]["concurrencies"]:
        key = f"c{c}"
        text += row(f"c={c}: latency p50 (ms)", lambda n, k=key: _get(plain, n, k, "latency_ms",
                                                                        "p50"), 3)
        text += row(f"c={c}: latency p99 (ms)", lambda n, k=key: _get(plain, n, k, "latency_ms",
                                                                        "p99"), 3)
        text += added_row(f"c={c}: added p50 (ms)",
                          lambda n, k=key: _get(plain, n, k, "latency_ms", "p50"), 3)
        text += added_row(f"c={c}: added p99 (ms)",
                          lambda n, k=key: _get(plain, n, k, "latency_ms", "p99"), 3)
        text += row(f"c={c}: requests/s", lambda n, k=key: _get(plain, n, k, "rps"), 0)
        text += row(f"c={c}: CPU-s per 1 000 requests",
                    lambda n, k=key: _get(plain, n, k, "cpu_s_per_1000"), 3)
        text += row(f"c={c}: CPU (% of a core)", lambda n, k=key: _get(plain, n, k, "cpu_percent"),
                    0)
        text += row(f"c={c}: of which in the kernel (% of a core)",
                    lambda n, k=key: _get(plain, n, k, "cpu_system_percent"), 0)
    text += row(f"c={results['plan']['concurrencies'][-1]}: upstream connections opened",
                lambda n: _get(plain, n, f"c{results['plan']['concurrencies'][-1]}",
                               "upstream_connections_opened"), 0)
    text += row("RSS after the plain runs (MB)",
                lambda n: _get(plain, n, f"c{results['plan']['concurrencies'][-1]}", "rss_mb"), 1)
    plan = results["plan"]
    text += (f"\n{plan['streams']} concurrent SSE streams ({plan['events']} events, "
             f"{plan['interval_ms']:g} ms apart, started over {plan['ramp']:g} s; the median of "
             f"{plan['stream_rounds']} measured round(s) by first-byte p50"
             + ("; the backend closes its connection after each stream, as llama-server does"
                if plan.get("backend_closes_after_streams") else "")
             + "):\n\n" + head)
    for label, series, stat in (("first byte p50 (ms)", "first_byte_ms", "p50"),
                                ("first byte p99 (ms)", "first_byte_ms", "p99")):
        text += row(label, lambda n, s=series, t=stat: _get(streams, n, s, t), 2)
        text += added_row("added " + label, lambda n, s=series, t=stat: _get(streams, n, s, t))
    if plan["stream_rounds"] > 1:
        text += ("| first byte p50, every round (ms) | " + " | ".join(
            ", ".join(_cell(r["first_byte_p50_ms"]) for r in streams[n]["rounds"])
            for n in names) + " |\n")
        text += ("| gap p99, every round (ms) | " + " | ".join(
            ", ".join(_cell(r["gap_p99_ms"]) for r in streams[n]["rounds"])
            for n in names) + " |\n")
    text += row("gap between events p50 (ms)", lambda n: _get(streams, n, "gap_ms", "p50"))
    text += row("gap between events p99 (ms)", lambda n: _get(streams, n, "gap_ms", "p99"))
    text += added_row("added p99 between events (ms)", lambda n: _get(streams, n, "gap_ms", "p99"))
    text += row("delivery delay p50 (ms)", lambda n: _get(streams, n, "delivery_ms", "p50"))
    text += row("delivery delay p99 (ms)", lambda n: _get(streams, n, "delivery_ms", "p99"))
    text += row("arrival/send spread, min (1 = unbuffered)",
                lambda n: _get(streams, n, "spread_ratio", "min"), 3)
    text += row("streams complete", lambda n: _get(streams, n, "complete"), 0)
    text += row("peak concurrent streams", lambda n: _get(streams, n, "peak_concurrent"), 0)
    text += row("upstream connections opened",
                lambda n: _get(streams, n, "upstream_connections_opened"), 0)
    text += row("CPU (% of a core)", lambda n: _get(streams, n, "cpu_percent"), 0)
    text += row("of which in the kernel (% of a core)",
                lambda n: _get(streams, n, "cpu_system_percent"), 0)
    text += row("CPU-ms per 1 000 events (stream set-up included)",
                lambda n: _get(streams, n, "cpu_ms_per_1000_events"), 1)
    text += row("RSS peak (MB)", lambda n: _get(streams, n, "peak_rss_mb"), 1)
    queued = results.get("queued") or {}
    if queued:
        text += (f"\n{plan['queued']} requests queued behind one busy slot (one-slot gateway, "
                 "real sockets; bench.queue_rss):\n\n| | RSS idle (MB) | RSS with them queued (MB) "
                 "| added (MB) | KiB per queued request | waiting |\n|---|---|---|---|---|---|\n")
        for name, q in queued.items():
            text += (f"| {TITLES.get(name, name)} | {_cell(q['rss_before_mb'], 1)} | "
                     f"{_cell(q['rss_mb'], 1)} | {_cell(q['rss_mb'] - q['rss_before_mb'], 1)} | "
                     f"{_cell(q['kib_per_request'], 1)} | {q['waiting']} |\n")
    text += ("\nIssue 18's goals, as ratios to the older gateway and nginx of this run (every "
             "llamaproxy feature on, one core):\n\n" + ratios.table(results, results["goals"]))
    if results["smoke"]:
        # A few seconds of small load only show that the benchmark and the gateway work; the
        # goals need the full run, so a smoke run does not judge them.
        text += ("\nThis was a smoke run, to check that the benchmark and the gateways work. "
                 "Its numbers come from a few seconds of small load and say little about "
                 "performance, so nothing is judged; for that, run `python -m bench.overhead "
                 "--older-gateway PATH` (several minutes) and compare with docs/performance.md.\n")
    info = results["machine"]
    text += (f"\nMachine: {info['nproc']} CPUs ({info['cpu']}), kernel {info['kernel']}, "
             f"Python {info['python']}, Twisted {info['twisted']}, {info['nginx']}, "
             f"{info['wrk']}; {results['pinning']}; load average before "
             f"{' '.join(results.get('load_average_before', ['?']))}, after "
             f"{' '.join(results.get('load_average_after', ['?']))}; "
             f"{results.get('busy_before_percent', 0):.0f} % busy before.\n")
    for note in results["notes"]:
        text += f"\nNote: {note}\n"
    return text


# -- the run ----------------------------------------------------------------------------------


def run(plan: Plan, root: Path, smoke: bool, use_nginx: bool = True,
        use_wrk: bool = True, quiet_wait: float = 0.0,
        older_export: Path | None = None, use_floor: bool = True) -> dict[str, Any]:
    """Start everything, measure, stop everything; the results document."""
    from bench import queue_rss  # it imports this module

    two_cores = cores() >= 2
    proxy_core, load_core = (0, 1) if two_cores else (None, None)
    notes: list[str] = []
    busy_before = (wait_quiet(quiet_wait) if quiet_wait > 0
                   else machine_busy_percent(0.5))
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    if busy_before >= 10:
        notes.append(f"the machine was {busy_before:.0f} % busy with other work before the run: "
                     "these numbers are noisy (see --wait-quiet)")
    if not two_cores:
        notes.append("fewer than 2 CPUs: nothing pinned, everything shares one core")
    if use_wrk and shutil.which("wrk") is None:
        use_wrk = False
        notes.append("wrk not used (--no-wrk) or not installed: the Python load generator "
                     "(bench.load plain) was used, its own cost limits the rates "
                     "(apt-get install -y wrk for the real numbers)")
    servers: list[Server] = []
    gateways: list[Server] = []
    older: Server | None = None
    older_data: older_gateway.DataDirectory | None = None
    queued: dict[str, Any] = {}
    features: dict[str, Any] = {}
    try:
        backend = start_backend(root, plan, load_core)
        servers.append(backend)
        backend_port = int(backend.url.rsplit(":", 1)[1])
        if use_nginx and nginx.available():
            nginx_port = free_port()
            nginx_process = nginx.start(root / "nginx", nginx_port, backend_port, proxy_core)
            servers.append(Server("nginx", f"http://127.0.0.1:{nginx_port}", nginx_process))
        else:
            notes.append("nginx not used (--no-nginx) or not installed: its column is skipped "
                         "(apt-get install -y nginx)")
        if older_export is not None:
            older, older_data = start_older(older_export, root, backend.url, proxy_core)
            servers.append(older)
            notes.extend(older_data.notes)
        else:
            notes.append("the older gateway was not given (--older-gateway PATH or "
                         "BENCH_OLDER_GATEWAY): its column is skipped")
        if use_floor:
            servers.append(start_floor(root, backend.url, proxy_core))
        for fast_paths in VARIANTS:
            gateways.append(start_gateway(root, backend.url, proxy_core, fast_paths))
        servers.extend(gateways)

        for server in servers:  # warm-up: pools filled, code paths hot
            run_plain(server, max(plan.concurrencies), plan.warmup, load_core, use_wrk,
                      backend.url)
        plain: dict[str, Any] = {"tool": "wrk" if use_wrk else "bench.load plain (Python)"}
        for concurrency in plan.concurrencies:
            for server in servers:
                plain.setdefault(server.name, {})[f"c{concurrency}"] = run_plain(
                    server, concurrency, plan.duration, load_core, use_wrk, backend.url)
        streams: dict[str, Any] = {}
        for server in servers:
            # One unmeasured round first: a proxy's upstream pool holds as many connections as
            # there are streams only after it has seen that many at once.
            run_streams(server, plan, load_core, backend.url)
            rounds = [run_streams(server, plan, load_core, backend.url)
                      for _ in range(plan.stream_rounds)]
            streams[server.name] = median_round(rounds)
        for gateway in gateways:
            features[gateway.name] = gateway_features(root, gateway)
        if older is not None and older_data is not None:
            features["older"] = older_features(older, older_data)
        for server in reversed(servers[1:]):  # the backend stays for the queue measurement
            server.process.stop()
        if plan.queued > 0:
            for fast_paths, name in VARIANTS.items():
                queued[name] = queue_rss.measure(root / f"queued-{fast_paths}", backend.url,
                                                 plan.queued, {"FAST_PATHS": fast_paths}, name)
    finally:
        for server in reversed(servers):
            server.process.stop()
    results: dict[str, Any] = {
        "smoke": smoke,
        "plan": asdict(plan),
        "machine": machine(),
        "pinning": ("proxies on core 0, backend and load generators on core 1" if two_cores
                    else "not pinned"),
        "plain": plain,
        "streams": streams,
        "queued": queued,
        "features": features,
        "busy_before_percent": busy_before,
        "load_average_before": load_before,
        "load_average_after": Path("/proc/loadavg").read_text().split()[:3],
        "notes": notes,
    }
    results["goals"] = ratios.goal_rows(results)
    return results


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small and quick (CI)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 10)")
    parser.add_argument("--streams", type=int, help="concurrent streams (default 500)")
    parser.add_argument("--json", type=Path, help="write the results document here")
    parser.add_argument("--markdown", type=Path, help="write the tables here")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx column")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the floor relay (bench/floor_relay.py) column")
    parser.add_argument("--no-wrk", action="store_true",
                        help="use the Python load generator even when wrk is installed")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for the machine to be under 10 %% busy")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--older-gateway", type=Path, metavar="PATH",
                        default=os.environ.get("BENCH_OLDER_GATEWAY") or None,
                        help="an export of zepfu/llama-gguf-inference: its scripts/gateway.py is "
                             "measured too (default: $BENCH_OLDER_GATEWAY; none: skipped)")
    parser.add_argument("--backend-closes-after-streams", action="store_true",
                        help="the fake backend closes after each stream, as llama-server does")
    parser.add_argument("--queued", type=int,
                        help="requests queued for the memory figure (default 10000; 0: skip)")
    args = parser.parse_args()
    if args.older_gateway is not None:
        try:
            older_gateway.script(args.older_gateway)
        except ValueError as error:
            parser.error(str(error))
    plan = Plan.smoke() if args.smoke else Plan()
    if args.duration is not None:
        plan = Plan(**{**asdict(plan), "duration": args.duration})
    if args.streams is not None:
        plan = Plan(**{**asdict(plan), "streams": args.streams})
    if args.queued is not None:
        plan = Plan(**{**asdict(plan), "queued": args.queued})
    if args.backend_closes_after_streams:
        plan = Plan(**{**asdict(plan), "backend_closes_after_streams": True})
    root = Path(tempfile.mkdtemp(prefix="llamaproxy-bench-"))
    started = time.monotonic()
    try:
        results = run(plan, root, args.smoke, not args.no_nginx, not args.no_wrk,
                      args.wait_quiet, args.older_gateway, not args.no_floor)
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    results["elapsed_s"] = time.monotonic() - started
    text = markdown(results)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
