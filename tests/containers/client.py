"""The client side of ``scripts/test-docker.sh``: requests against gateways running in containers.

Each subcommand prints what it saw and exits 0 when the check holds, 1 otherwise::

    python tests/containers/client.py wait-ready URL [TIMEOUT]
    python tests/containers/client.py stream URL KEY          # streamed chat completion
    python tests/containers/client.py unauthorized URL        # no key: 401, OpenAI-shaped
    python tests/containers/client.py drain URL HEALTH_URL KEY CONTAINER DRAIN_TIMEOUT [DOCKER]
    python tests/containers/client.py dashboard PROMETHEUS_URL DASHBOARD_JSON

``dashboard`` runs every expression of the Grafana dashboard on a real Prometheus that scrapes the
gateway: none may fail to parse or evaluate, and the panels the issue asks for must have data.

``drain`` holds a stream open with backpressure (as tests/e2e/test_admission.py does), runs
``docker stop CONTAINER`` while the stream is in flight, checks that readiness turns 503, then
reads the rest of the stream and checks that it ended whole (``data: [DONE]``) and that
``docker stop`` returned within DRAIN_TIMEOUT seconds.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import httpx

CHAT = {"messages": [{"role": "user", "content": "Hello from a container"}], "temperature": 0}


def fail(message: str) -> int:
    print(f"FAIL: {message}")
    return 1


def wait_ready(url: str, timeout: float = 120.0) -> int:
    """Poll ``URL/readyz`` until it answers 200."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/readyz", timeout=5)
            if response.status_code == 200:
                print(f"ready: {url}/readyz 200")
                return 0
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    return fail(f"{url}/readyz not ready after {timeout:.0f} s (last: {last})")


def stream(url: str, key: str) -> int:
    """A streamed chat completion with a key: 200, several content chunks, ``[DONE]``."""
    body = {**CHAT, "max_tokens": 16, "stream": True}
    chunks = 0
    finish = None
    done = False
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as response:
        if response.status_code != 200:
            response.read()
            return fail(f"status {response.status_code}: {response.text[:300]}")
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return fail(f"content-type {response.headers.get('content-type')}")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                continue
            choice = json.loads(data)["choices"][0]
            if choice["delta"].get("content"):
                chunks += 1
            finish = choice.get("finish_reason") or finish
    if not done or chunks < 2 or finish != "length":
        return fail(f"stream: {chunks} content chunks, finish_reason {finish}, [DONE] {done}")
    print(f"stream: {chunks} content chunks, finish_reason {finish}, [DONE]")
    return 0


def unauthorized(url: str) -> int:
    """No key: 401 with an OpenAI-shaped error."""
    response = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 1}, timeout=30)
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return fail(f"not an OpenAI error: {response.status_code} {response.text[:200]}")
    if response.status_code != 401 or "message" not in error:
        return fail(f"expected 401, got {response.status_code} {error}")
    print(f"no key: 401 {error.get('code')}")
    return 0


def _health(url: str) -> dict[str, object]:
    return dict(httpx.get(f"{url}/health", timeout=5).json())


def drain(url: str, health_url: str, key: str, container: str, drain_timeout: str,
          docker: str = "docker") -> int:
    """``docker stop`` during a held stream: readiness 503, the stream ends whole."""
    parts = urlsplit(url)
    body = json.dumps({**CHAT, "max_tokens": 3000, "stream": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parts.hostname or "127.0.0.1", parts.port or 80))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    sock.settimeout(90)
    received = sock.recv(4096)
    if not received.startswith(b"HTTP/1.1 200"):
        return fail(f"held stream: {received[:300]!r}")
    queue = _health(url).get("queue")
    active = queue.get("active") if isinstance(queue, dict) else None
    if active != 1:
        return fail(f"the held stream is not in flight (queue: {queue})")
    started = time.monotonic()
    stop = subprocess.Popen([docker, "stop", container], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    readyz = None
    while time.monotonic() < deadline:
        try:
            readyz = httpx.get(f"{health_url}/readyz", timeout=5).status_code
        except httpx.HTTPError:
            readyz = None
        if readyz == 503:
            break
        time.sleep(0.1)
    if readyz != 503:
        stop.wait()
        return fail(f"readiness did not turn 503 while draining (last: {readyz})")
    print("draining: /readyz 503 while the stream is in flight")
    while not received.endswith(b"0\r\n\r\n"):
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        received += chunk
    sock.close()
    stop.wait(120)
    elapsed = time.monotonic() - started
    text = received.decode("utf-8", "replace")
    if '"finish_reason":"length"' not in text.replace(" ", "") or "data: [DONE]" not in text:
        return fail(f"the stream was cut by the stop ({len(received)} bytes, "
                    f"tail {received[-200:]!r})")
    print(f"stream finished whole ({len(received)} bytes); docker stop took {elapsed:.1f} s")
    if stop.returncode != 0 or elapsed > float(drain_timeout):
        return fail(f"docker stop: status {stop.returncode} after {elapsed:.1f} s "
                    f"(DRAIN_TIMEOUT {drain_timeout} s)")
    return 0


#: Panels whose every expression must return data once the gateway has served traffic: request
#: rate, latency percentiles, queue depth, slots in use, tokens/s, errors, backend restarts.
PANELS_WITH_DATA = (
    "Backend ready", "Backend restarts (range)", "Slots in use", "Queue depth",
    "Request rate by route", "Request rate by status", "Request latency (chat, completions)",
    "Time to first byte (chat, completions)", "Queue depth and slots", "Tokens per second",
    "Backend restarts and state",
)


def dashboard(prometheus: str, path: str) -> int:
    """Every dashboard expression on a real Prometheus: valid, and with data where it must."""
    with open(path) as f:
        panels = json.load(f)["panels"]
    # Prometheus needs two scrapes in the window before rate() has a value.
    deadline = time.monotonic() + 60
    # A Prometheus just started (or just installed) takes a moment to listen, then answers 503
    # (plain text) until its storage is open: both count as "not yet" until the deadline.
    while time.monotonic() < deadline:
        try:
            up = httpx.get(f"{prometheus}/api/v1/query", timeout=10,
                           params={"query": 'sum_over_time(up{job="llamaproxy"}[1m]) >= 3'}).json()
        except (httpx.HTTPError, ValueError):
            up = {}
        if up.get("data", {}).get("result"):
            break
        time.sleep(1)
    else:
        return fail("Prometheus did not scrape the gateway three times within 60 s")
    missing = set(PANELS_WITH_DATA) - {panel["title"] for panel in panels}
    problems = [f"no panel {title!r}" for title in sorted(missing)]
    with_data = 0
    total = 0
    for panel in panels:
        for target in panel["targets"]:
            total += 1
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$__range", "5m")
            answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr},
                               timeout=10).json()
            if answer.get("status") != "success":
                problems.append(f"{panel['title']}: {expr}: {answer.get('error')}")
                continue
            if answer["data"]["result"]:
                with_data += 1
            elif panel["title"] in PANELS_WITH_DATA:
                problems.append(f"{panel['title']}: no data for {expr}")
    for problem in problems:
        print(f"  {problem}")
    print(f"dashboard on Prometheus: {total} expressions, {with_data} with data, "
          f"{len(problems)} problems")
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    command, args = argv[0], argv[1:]
    if command == "wait-ready":
        return wait_ready(args[0], float(args[1]) if len(args) > 1 else 120.0)
    if command == "stream":
        return stream(args[0], args[1])
    if command == "unauthorized":
        return unauthorized(args[0])
    if command == "drain":
        return drain(*args)
    if command == "dashboard":
        return dashboard(args[0], args[1])
    print(f"unknown command {command}")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
