"""What sharing limits, usage and slots through Redis costs: req/s at c=64, STATE_URL off vs on.

One fake backend (:mod:`bench.fake_backend`), one ``redis-server`` (Debian's, on a loopback port,
nothing saved), and one ``twistd llamaproxy`` in front of the backend, measured twice in one run
with the same load: first without ``STATE_URL`` (everything in process), then with it (request
limit checked by a Lua script per request, usage counters flushed each second, the backend's
slots leased). Same settings as :mod:`bench.overhead` otherwise (auth, access log, metrics,
ledger). The gateway runs on core 0; the backend, Redis and the load generator on core 1.

    .venv/bin/python -m bench.shared_state [--duration 10] [--smoke] [--json out.json]

Prints a markdown table: requests/s, latency p50/p99, gateway CPU per 1 000 requests, and the
Redis calls made per request; nothing is asserted (speed belongs here, not in tests).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.overhead import Plan, Server, gateway_env, run_plain, start_backend
from bench.procs import (
    Process,
    cores,
    free_port,
    http_status,
    machine,
    pinned,
    venv_script,
    wait_until,
)


def start_redis(root: Path, core: int | None) -> tuple[Process, int]:
    """Debian's redis-server on a free loopback port, nothing persisted."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(root)]
    process = Process("redis-server", pinned(command, core), root / "redis.log")

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    wait_until(listening, 10, "redis-server", process)
    return process, port


def redis_calls(port: int) -> int:
    """Round trips Redis has answered so far: the commands the gateway sends (scripts, PING),
    from INFO commandstats (the commands a script runs inside are not round trips)."""
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "commandstats"],
                         capture_output=True, text=True, check=True, timeout=10).stdout
    total = 0
    for line in out.splitlines():
        name, _, fields = line.partition(":")
        if name in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_ping", "cmdstat_select"):
            total += int(fields.split("calls=", 1)[1].split(",", 1)[0])
    return total


def start_gateway(root: Path, backend_url: str, core: int | None, state_url: str) -> Server:
    """``twistd -n llamaproxy`` in front of ``backend_url``, with or without STATE_URL."""
    port = free_port()
    name = "on" if state_url else "off"
    directory = root / f"gateway-{name}"
    directory.mkdir()
    env = {**gateway_env(directory, port, backend_url), "STATE_URL": state_url}
    command = [venv_script("twistd"), "-n", "--pidfile=", "--logfile",
               str(directory / "twistd.log"), "llamaproxy"]
    process = Process(f"llamaproxy ({name})", pinned(command, core), directory / "twistd.out",
                      env=env, cwd=directory)
    wait_until(lambda: http_status(port, "/readyz") == 200, 30, "llamaproxy /readyz", process)
    return Server(f"STATE_URL {name}", f"http://127.0.0.1:{port}", process,
                  "sk-bench-0123456789abcdef0123")


def run(plan: Plan, root: Path, concurrency: int) -> dict[str, Any]:
    """Both configurations, one after the other, same load."""
    two_cores = cores() >= 2
    gateway_core, load_core = (0, 1) if two_cores else (None, None)
    use_wrk = shutil.which("wrk") is not None
    results: dict[str, Any] = {
        "machine": machine(), "concurrency": concurrency, "duration_s": plan.duration,
        "load_generator": "wrk" if use_wrk else "bench.load plain (Python)", "runs": {},
    }
    processes: list[Process] = []
    try:
        backend = start_backend(root, plan, load_core)
        processes.append(backend.process)
        redis, redis_port = start_redis(root, load_core)
        processes.append(redis)
        for state_url in ("", f"redis://127.0.0.1:{redis_port}/0"):
            gateway = start_gateway(root, backend.url, gateway_core, state_url)
            try:
                time.sleep(0.5)  # connected to Redis
                run_plain(gateway, concurrency, plan.warmup, load_core, use_wrk, backend.url)
                before = redis_calls(redis_port)
                result = run_plain(gateway, concurrency, plan.duration, load_core, use_wrk,
                                   backend.url)
                calls = redis_calls(redis_port) - before
                if state_url:
                    with urllib.request.urlopen(gateway.url + "/health", timeout=10) as answer:
                        result["state_store"] = json.loads(answer.read())["state_store"]
                result["redis_calls_per_request"] = (
                    calls / result["requests"] if result["requests"] else None
                )
                results["runs"][gateway.name] = result
            finally:
                gateway.process.stop()
    finally:
        for process in reversed(processes):
            process.stop()
    off, on = results["runs"].get("STATE_URL off"), results["runs"].get("STATE_URL on")
    if off and on and off["rps"]:
        results["on_vs_off"] = on["rps"] / off["rps"]
    return results


def markdown(results: dict[str, Any]) -> str:
    """The results as a table."""
    lines = [
        f"req/s at c={results['concurrency']}, {results['duration_s']:g} s per run, "
        f"load generator: {results['load_generator']}",
        "",
        "| | req/s | p50 ms | p99 ms | gateway CPU s / 1000 req | Redis calls / req |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, run_result in results["runs"].items():
        latency = run_result["latency_ms"]
        calls = run_result.get("redis_calls_per_request")
        per_1000 = run_result.get("cpu_s_per_1000")
        lines.append(
            f"| {name} | {run_result['rps']:.0f} | {latency['p50']:.2f} | {latency['p99']:.2f} "
            f"| {per_1000:.3f} | {calls:.2f} |" if per_1000 is not None and calls is not None
            else f"| {name} | {run_result['rps']:.0f} | {latency['p50']:.2f} | "
            f"{latency['p99']:.2f} | - | - |"
        )
    store = results["runs"].get("STATE_URL on", {}).get("state_store")
    if store and store.get("limits") and store["limits"]["batches"]:
        limits = store["limits"]
        lines += ["", f"limit checks per script call: {limits['checks'] / limits['batches']:.1f} "
                  f"({limits['checks']} checks, {limits['batches']} calls)"]
    if "on_vs_off" in results:
        lines += ["", f"STATE_URL on / off: {results['on_vs_off'] * 100:.0f} % of the req/s"]
    return "\n".join(lines)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="a second per run")
    parser.add_argument("--json", type=Path, help="write the results document here")
    args = parser.parse_args()
    plan = Plan(duration=1.0 if args.smoke else args.duration, warmup=0.5 if args.smoke else 2.0)
    root = Path(tempfile.mkdtemp(prefix="llamaproxy-bench-state-"))
    try:
        results = run(plan, root, args.concurrency)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(markdown(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
