"""A reproducible soak: the real twistd for minutes under a mixed load, then what drifted.

It starts bench/fake_backend.py as an external backend (``BACKEND_URL``) and ``twistd -n
llamaproxy`` in front of it with ``--keys`` API keys, a usage ledger and an access log, and sends
``--rate`` requests per second for ``--duration`` seconds in a fixed mix (``--mix``): full
streams, streams cut by the client, slow-reading streams, plain requests, wrong keys, bad JSON.
Meanwhile it rotates a key ``--rotations`` times (rewrite + SIGHUP) and, with ``--kill-at``,
kills the backend (SIGKILL) for ``--kill-for`` seconds. Every ``--sample`` seconds it reads the
gateway's RSS, open file descriptors, threads and metric series. At the end it prints:

- slopes (per minute, least squares after the first minute) of RSS, fds, threads and series;
- latency drift: the median of plain requests in the first and the last minute;
- what clients got (status counts, per kind), what they got during the backend outage;
- accounting: tokens and requests the clients saw completed against the ledger's totals, the
  access log's line count against the requests sent, the gateway log's line count.

    python -m bench.soak --duration 1200 --rate 100 [--kill-at 630 --kill-for 3] [--json out.json]

It measures; it does not judge (no thresholds). Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procs

KINDS = ("stream", "plain", "cut", "slow", "badkey", "badjson")
DEFAULT_MIX = "stream=40,plain=30,cut=10,slow=5,badkey=10,badjson=5"
_USAGE = re.compile(rb'"usage":\s*(\{[^}]*\})')


@dataclass
class Outcome:
    """One request as the client saw it."""

    kind: str
    key_id: str | None
    sent_at: float
    status: int | None
    seconds: float
    completion_tokens: int = 0
    prompt_tokens: int = 0
    complete: bool = False


@dataclass
class Soak:
    """The state of one run."""

    args: argparse.Namespace
    root: Path
    keys: dict[str, str] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[dict[str, float]] = field(default_factory=list)
    outage: tuple[float, float] | None = None
    rotations: list[float] = field(default_factory=list)


def parse_mix(text: str) -> list[tuple[str, int]]:
    """``kind=weight,...`` → [(kind, weight)], every kind known and every weight >= 0."""
    mix = []
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind.strip() not in KINDS or not weight.strip().isdigit():
            raise SystemExit(f"--mix: {part!r}: use kind=weight with kinds {', '.join(KINDS)}")
        mix.append((kind.strip(), int(weight)))
    return mix


def write_keys(path: Path, keys: dict[str, str]) -> None:
    """The key file, written atomically (the gateway watches it)."""
    text = "# llamaproxy API keys (soak)\n" + "".join(f"{k}:{v}:100000\n" for k, v in keys.items())
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


# -- the client ---------------------------------------------------------------------------------


def _request(kind: str, key: str) -> bytes:
    stream = kind in ("stream", "cut", "slow")
    body: bytes
    if kind == "badjson":
        body = b'{"messages": [ this is not json'
    else:
        doc: dict[str, Any] = {"model": "fake", "max_tokens": 16,
                               "messages": [{"role": "user", "content": "hi"}]}
        if stream:
            doc["stream"] = True
            doc["stream_options"] = {"include_usage": True}
        body = json.dumps(doc).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer " + key.encode() +
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def one_request(soak: Soak, kind: str, key_id: str | None) -> None:
    key = soak.keys[key_id] if key_id is not None else "sk-wrong-" + secrets.token_hex(12)
    started = time.monotonic()
    outcome = Outcome(kind, key_id, started, None, 0.0)
    soak.outcomes.append(outcome)
    writer = None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", soak.args.port)
        writer.write(_request(kind, key))
        await writer.drain()
        data = b""
        while True:
            chunk = await asyncio.wait_for(reader.read(256 if kind == "slow" else 65536), 30)
            if not chunk:
                break
            data += chunk
            if outcome.status is None and b"\r\n" in data:
                outcome.status = int(data.split(b" ", 2)[1])
            if kind == "cut" and data.count(b"data: ") >= 3:
                break  # the client hangs up mid-stream
            if kind == "slow":
                await asyncio.sleep(0.02)
        if outcome.status is None and data:
            outcome.status = int(data.split(b" ", 2)[1])
        if kind != "cut" and outcome.status == 200:
            usage = _USAGE.findall(data)
            if usage:
                doc = json.loads(usage[-1])
                outcome.prompt_tokens = int(doc.get("prompt_tokens", 0))
                outcome.completion_tokens = int(doc.get("completion_tokens", 0))
            # (the raw bytes: chunk framing follows the last event)
            outcome.complete = kind == "plain" or b"data: [DONE]" in data
    except (OSError, TimeoutError, ValueError, IndexError):
        pass
    finally:
        outcome.seconds = time.monotonic() - started
        if writer is not None:
            writer.close()


async def load(soak: Soak, mix: list[tuple[str, int]], t0: float) -> None:
    """Send ``--rate`` requests per second, round-robin over the mix and the keys."""
    schedule = [kind for kind, weight in mix for _ in range(weight)]
    key_ids = list(soak.keys)
    tasks: set[asyncio.Task[None]] = set()
    n = 0
    interval = 1.0 / soak.args.rate
    while time.monotonic() - t0 < soak.args.duration:
        kind = schedule[(n * 7) % len(schedule)]  # 7 is coprime with 100: kinds interleave
        key_id = None if kind == "badkey" else key_ids[n % len(key_ids)]
        task = asyncio.create_task(one_request(soak, kind, key_id))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
        await asyncio.sleep(max(0.0, t0 + n * interval - time.monotonic()))
    if tasks:
        await asyncio.wait(tasks, timeout=60)


# -- the harness --------------------------------------------------------------------------------


def _series_count(port: int) -> int:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/metrics", headers={"Accept": "text/plain"})
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


async def sampler(soak: Soak, gateway: procs.Process, t0: float) -> None:
    while time.monotonic() - t0 < soak.args.duration:
        pid = gateway.pid
        status = Path(f"/proc/{pid}/status").read_text()
        threads = int(re.search(r"Threads:\s+(\d+)", status)[1])  # type: ignore[index]
        series = await asyncio.to_thread(_series_count, soak.args.port)
        soak.samples.append({
            "t": time.monotonic() - t0,
            "rss_mb": procs.memory_kib([pid]) / 1024,
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": threads,
            "series": series,
        })
        await asyncio.sleep(soak.args.sample)


async def rotations(soak: Soak, gateway: procs.Process, t0: float) -> None:
    for i in range(soak.args.rotations):
        at = soak.args.duration * (i + 1) / (soak.args.rotations + 1)
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        key_id = f"k{i % len(soak.keys)}"
        soak.keys[key_id] = "sk-soak-" + secrets.token_hex(16)
        write_keys(soak.root / "api_keys.txt", soak.keys)
        os.kill(gateway.pid, signal.SIGHUP)
        soak.rotations.append(time.monotonic() - t0)


async def backend_kill(soak: Soak, backend: list[procs.Process], t0: float) -> None:
    if soak.args.kill_at is None:
        return
    await asyncio.sleep(max(0.0, t0 + soak.args.kill_at - time.monotonic()))
    killed_at = time.monotonic() - t0
    os.kill(backend[0].pid, signal.SIGKILL)
    backend[0].stop(5)
    await asyncio.sleep(soak.args.kill_for)
    backend[0] = start_backend(soak)
    soak.outage = (killed_at, time.monotonic() - t0)


def start_backend(soak: Soak) -> procs.Process:
    process = procs.Process(
        "fake-backend",
        [sys.executable, "-m", "bench.fake_backend", "--port", str(soak.args.backend_port),
         "--events", "16", "--interval-ms", "10", "--lifetime", "0"],
        soak.root / f"backend-{time.monotonic():.0f}.log",
    )
    procs.wait_until(lambda: procs.http_status(soak.args.backend_port, "/health") == 200, 20,
                     "the fake backend", process)
    return process


def slope_per_minute(samples: list[dict[str, float]], name: str) -> float | None:
    """Least-squares slope of ``name`` per minute, ignoring the first minute (warm-up)."""
    points = [(s["t"] / 60, s[name]) for s in samples if s["t"] >= 60]
    if len(points) < 3:
        points = [(s["t"] / 60, s[name]) for s in samples]
    if len(points) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return None if var == 0 else sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def report(soak: Soak, ledger_rows: list[Any], access_lines: int, log_lines: int,
           rejection_lines: int) -> dict[str, Any]:
    """The numbers of the run, as a document (also printed as text by ``main``)."""
    args, out = soak.args, soak.outcomes
    plain = [o for o in out if o.kind == "plain" and o.status == 200]
    first = [o.seconds * 1000 for o in plain if o.sent_at - out[0].sent_at < 60]
    last_start = out[-1].sent_at - 60
    last = [o.seconds * 1000 for o in plain if o.sent_at >= last_start]
    by_kind = {kind: dict(Counter(str(o.status) for o in out if o.kind == kind)) for kind in KINDS}
    during = {}
    if soak.outage is not None:
        t0 = out[0].sent_at
        start, end = soak.outage
        window = [o for o in out if start <= o.sent_at - t0 <= end + 1.0]
        during = {"from_s": round(start, 1), "to_s": round(end, 1),
                  "statuses": dict(Counter(str(o.status) for o in window)),
                  "longest_ms": round(max((o.seconds for o in window), default=0) * 1000, 1)}
    complete = [o for o in out if o.complete and o.key_id is not None]
    ledger_requests = sum(r.requests for r in ledger_rows)
    ledger_completion = sum(r.completion_tokens for r in ledger_rows)
    ledger_prompt = sum(r.prompt_tokens for r in ledger_rows)
    return {
        "duration_s": args.duration, "rate": args.rate, "mix": args.mix, "keys": args.keys,
        "requests_sent": len(out), "rotations_at_s": [round(t, 1) for t in soak.rotations],
        "slopes_per_minute": {name: slope_per_minute(soak.samples, name)
                              for name in ("rss_mb", "fds", "threads", "series")},
        "first_sample": soak.samples[0] if soak.samples else None,
        "last_sample": soak.samples[-1] if soak.samples else None,
        "plain_latency_ms": {
            "first_minute_p50": statistics.median(first) if first else None,
            "last_minute_p50": statistics.median(last) if last else None,
        },
        "statuses_by_kind": by_kind,
        "backend_outage": during,
        "accounting": {
            "client_complete_requests": len(complete),
            "client_completion_tokens": sum(o.completion_tokens for o in complete),
            "client_prompt_tokens": sum(o.prompt_tokens for o in complete),
            "client_cut_streams": sum(1 for o in out if o.kind == "cut" and o.status == 200),
            "ledger_requests": ledger_requests,
            "ledger_completion_tokens": ledger_completion,
            "ledger_prompt_tokens": ledger_prompt,
        },
        "access_log_lines": access_lines,
        "gateway_log_lines": log_lines,
        "gateway_log_rejection_lines": rejection_lines,
    }


def _text(doc: dict[str, Any]) -> str:
    lines = [f"soak: {doc['duration_s']:g} s at {doc['rate']:g} requests/s, mix {doc['mix']}, "
             f"{doc['keys']} keys; {doc['requests_sent']} requests sent; key rotations at "
             f"{doc['rotations_at_s']} s"]
    slopes = doc["slopes_per_minute"]
    lines.append("slopes per minute (after the first minute): " + ", ".join(
        f"{k} {v:+.4g}" if v is not None else f"{k} -" for k, v in slopes.items()))
    if doc["first_sample"] and doc["last_sample"]:
        f, la = doc["first_sample"], doc["last_sample"]
        lines.append("first/last sample: " + ", ".join(
            f"{k} {f[k]:.4g}/{la[k]:.4g}" for k in ("rss_mb", "fds", "threads", "series")))
    lat = doc["plain_latency_ms"]
    lines.append(f"plain request p50: first minute {lat['first_minute_p50']} ms, last minute "
                 f"{lat['last_minute_p50']} ms")
    for kind, statuses in doc["statuses_by_kind"].items():
        lines.append(f"  {kind}: {statuses}")
    if doc["backend_outage"]:
        lines.append(f"backend outage: {doc['backend_outage']}")
    acc = doc["accounting"]
    lines.append(
        f"accounting: clients saw {acc['client_complete_requests']} complete answers, "
        f"{acc['client_prompt_tokens']}/{acc['client_completion_tokens']} prompt/completion "
        f"tokens ({acc['client_cut_streams']} streams cut by the client); the ledger has "
        f"{acc['ledger_requests']} requests, {acc['ledger_prompt_tokens']}/"
        f"{acc['ledger_completion_tokens']} tokens")
    lines.append(f"access log: {doc['access_log_lines']} API lines for {doc['requests_sent']} "
                 f"requests; gateway log: {doc['gateway_log_lines']} lines "
                 f"({doc['gateway_log_rejection_lines']} about rejections)")
    return "\n".join(lines)


async def run(soak: Soak) -> dict[str, Any]:
    args = soak.args
    soak.keys.update({f"k{i}": "sk-soak-" + secrets.token_hex(16) for i in range(args.keys)})
    write_keys(soak.root / "api_keys.txt", soak.keys)
    backend = [start_backend(soak)]
    env = {
        **os.environ, "BACKEND_URL": f"http://127.0.0.1:{args.backend_port}",
        "PORT": str(args.port), "PORT_HEALTH": str(procs.free_port()), "HOST": "127.0.0.1",
        "DATA_DIR": str(soak.root), "AUTH_KEYS_FILE": str(soak.root / "api_keys.txt"),
        "METRICS_AUTH_ENABLED": "false", "MAX_CONCURRENT_REQUESTS": "64",
        "INSTANCE_ID": f"soak-{args.port}",
    }
    log_path = soak.root / "twistd.log"
    gateway = procs.Process(
        "twistd", [procs.venv_script("twistd"), "-n", "--pidfile=", "--logfile", str(log_path),
                   "llamaproxy"], soak.root / "twistd.out", env=env, cwd=soak.root)
    try:
        procs.wait_until(lambda: procs.http_status(args.port, "/readyz") == 200, 60,
                         "the gateway", gateway)
        t0 = time.monotonic()
        mix = parse_mix(args.mix)
        await asyncio.gather(load(soak, mix, t0), sampler(soak, gateway, t0),
                             rotations(soak, gateway, t0), backend_kill(soak, backend, t0))
    finally:
        gateway.stop(60)
        backend[0].stop(5)
    from llamaproxy.observability.usage import query

    ledger = query(str(soak.root / "usage.sqlite3"))
    access = soak.root / "logs" / "api_access.log"
    access_lines = sum(1 for line in access.read_text().splitlines()  # not /readyz, /metrics
                       if "/v1/chat/completions" in line) if access.exists() else 0
    log_text = log_path.read_text(errors="replace") if log_path.exists() else ""
    rejection_lines = sum(1 for line in log_text.splitlines() if "Rejected" in line)
    return report(soak, ledger, access_lines, len(log_text.splitlines()), rejection_lines)


def main() -> None:
    """Command line: run one soak and print (and with --json, write) its report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1200.0, help="seconds of load")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument("--mix", default=DEFAULT_MIX, help=f"kind=weight,... ({DEFAULT_MIX})")
    parser.add_argument("--keys", type=int, default=20, help="API keys the load uses")
    parser.add_argument("--rotations", type=int, default=3,
                        help="key rotations (rewrite + SIGHUP), evenly spread")
    parser.add_argument("--kill-at", type=float, default=None,
                        help="kill the backend (SIGKILL) this many seconds in")
    parser.add_argument("--kill-for", type=float, default=3.0, help="seconds it stays down")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory")
    args = parser.parse_args()
    args.port, args.backend_port = procs.free_port(), procs.free_port()
    root = Path(tempfile.mkdtemp(prefix="llamaproxy-soak-"))
    soak = Soak(args, root)
    try:
        doc = asyncio.run(run(soak))
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    print(_text(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
