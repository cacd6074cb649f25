"""Where llamaproxy spends its time under the plain-request load: py-spy on the real gateway.

Starts the fake backend and ``twistd -n llamaproxy`` exactly as :mod:`bench.overhead` does
(gateway on core 0, every feature on), drives it with ``wrk`` at concurrency 64 (``--connections``
to change it; or, with ``--load streams``, with back-to-back rounds of 500 concurrent SSE
streams) and samples it with ``py-spy record --format raw --idle`` (each frame at its current
line). Prints the functions with the most self time and the most inclusive time, and self time
per file, as markdown; ``--svg`` also records a flame graph in a second pass. ``--idle`` keeps
the samples taken in system calls (a socket ``send``, the log file's ``write``), which py-spy
would otherwise drop as idle; the reactor waiting in ``epoll`` (the line of its loop that calls
``poll``, stock or ``FAST_PATHS``' lean loop) and pool threads waiting for work are counted apart
as idle. py-spy pauses the gateway for each sample (consistent stacks; the gateway runs about
20 % slower while sampled), so the proportions are right and the absolute rates are not: take
those from :mod:`bench.overhead`.

    .venv/bin/pip install py-spy
    .venv/bin/python -m bench.profile_gateway [--duration 15] [--svg profile.svg]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.overhead import LUA, PATH, Plan, start_backend, start_gateway
from bench.procs import cores, pinned, venv_script

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
_PREFIXES = ("site-packages/", "lib/python3.11/", "lib/python3.12/", "lib/python3.13/")


def short_file(path: str) -> str:
    """``twisted/web/http.py`` rather than the whole site-packages path."""
    for prefix in _PREFIXES:
        if prefix in path:
            return path.split(prefix, 1)[1]
    if "/llamaproxy/" in path:
        return "llamaproxy/" + path.rsplit("/llamaproxy/", 1)[1]
    return path


def parse_frame(frame: str) -> tuple[str, str, int | None]:
    """(function, short file, line) of one py-spy frame ``function (file:line)``."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), "?", None
    line = match["line"]
    return match["function"], short_file(match["file"]), int(line) if line else None


#: Leaf frames of a pool thread with nothing to do.
IDLE_FRAMES = frozenset({"Condition.wait", "Event.wait"})
#: The reactor's loops, (function, file): the stock one, and the lean one of ``FAST_PATHS``.
POLL_LOOPS = {
    ("EPollReactor.doPoll", "twisted/internet/epollreactor.py"),
    ("install.<locals>.do_poll", "llamaproxy/fastpath/lean_poll.py"),
}


def _poll_line(function: str, file: str, cache: dict[tuple[str, str], int | None]) -> int | None:
    """The line of ``function`` (one of ``POLL_LOOPS``) that waits in ``epoll``: a sample
    there is the reactor waiting; anywhere else in the loop it is dispatching events."""
    key = (function, file)
    if key not in cache:
        cache[key] = None
        root = (Path(__file__).resolve().parent.parent if file.startswith("llamaproxy/")
                else Path(sysconfig.get_paths()["purelib"]))
        source = root / file
        if source.is_file():
            for number, text in enumerate(source.read_text().splitlines(), 1):
                if "_poller.poll(" in text:
                    cache[key] = number
                    break
    return cache[key]


@dataclass
class Profile:
    """Samples of the reactor (main) thread, and how busy every thread was."""

    samples: int = 0
    busy: int = 0
    own: Counter[tuple[str, str]] = field(default_factory=Counter)
    inclusive: Counter[tuple[str, str]] = field(default_factory=Counter)
    per_file: Counter[str] = field(default_factory=Counter)
    #: thread name -> (samples, busy samples)
    threads: dict[str, list[int]] = field(default_factory=dict)


def analyse(raw: str) -> Profile:
    """Collapsed stacks recorded with ``--threads`` (first frame ``thread (id): name``) and
    the current line of each frame (not py-spy's ``--function``: the reactor loop's own line
    tells waiting from dispatching)."""
    profile = Profile()
    poll_lines: dict[tuple[str, str], int | None] = {}
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        thread, *rest = stack.split(";")
        name = thread.split(": ", 1)[-1].strip()
        located = [parse_frame(f) for f in rest if f.strip()]
        frames = [(function, file) for function, file, _ in located]
        idle = not frames or frames[-1][0] in IDLE_FRAMES or (
            frames[-1] in POLL_LOOPS
            and located[-1][2] == _poll_line(*frames[-1], poll_lines))
        counts = profile.threads.setdefault(name, [0, 0])
        counts[0] += count
        counts[1] += 0 if idle else count
        if name != "MainThread":
            continue
        profile.samples += count
        if idle:
            continue
        profile.busy += count
        profile.own[frames[-1]] += count
        profile.per_file[frames[-1][1]] += count
        for frame in set(frames):
            profile.inclusive[frame] += count
    return profile


def report(raw: str, rate: int, duration: float, top: int = 25) -> str:
    """Markdown tables: the top functions by self and inclusive time, self time per file."""
    profile = analyse(raw)
    total = profile.busy
    if total == 0:
        return "No samples (is the gateway busy? does py-spy have ptrace rights?)\n"
    others = ", ".join(f"{name} {busy}/{samples}" for name, (samples, busy)
                       in sorted(profile.threads.items()) if name != "MainThread")
    text = (f"{profile.samples} samples of the reactor thread at {rate} Hz over {duration:g} "
            f"s, {total} of them busy ({total / profile.samples * 100:.0f} %; not waiting in "
            f"epoll). Other threads, busy/samples: {others or 'none'}. Percentages are of the "
            f"reactor thread's busy samples; a system call counts as the Python function "
            f"making it.\n\n")
    text += "Self time (the function itself, not what it calls):\n\n"
    text += "| % self | function | file |\n|---|---|---|\n"
    for (function, file), count in profile.own.most_common(top):
        text += f"| {count / total * 100:.1f} | `{function}` | {file} |\n"
    text += ("\nInclusive time (the function and everything it calls; the reactor loop and "
             "twistd frames above 90 % left out):\n\n")
    text += "| % incl. | function | file |\n|---|---|---|\n"
    shown = [(frame, count) for frame, count in profile.inclusive.most_common()
             if count <= 0.9 * total][:top + 10]
    for (function, file), count in shown:
        text += f"| {count / total * 100:.1f} | `{function}` | {file} |\n"
    text += "\nSelf time per file:\n\n| % self | file |\n|---|---|\n"
    for file, count in profile.per_file.most_common(top):
        text += f"| {count / total * 100:.1f} | {file} |\n"
    return text


def _load_command(load: str, url: str, api_key: str, seconds: float, core: int | None,
                  streams: int, connections: int = 64) -> list[str]:
    if load == "plain":
        return pinned(["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "-s", str(LUA),
                       url + PATH], core)
    return pinned([sys.executable, "-m", "bench.load", "streams", "--url", url, "--api-key",
                   api_key, "--streams", str(streams), "--events", "50"], core)


def record(pid: int, url: str, api_key: str, duration: float, rate: int, output: Path,
           form: str, load_core: int | None, load: str = "plain", streams: int = 500,
           connections: int = 64) -> None:
    """Load the gateway (wrk with ``connections``, or rounds of ``streams`` SSE streams) while
    py-spy samples ``pid`` for ``duration`` seconds."""
    deadline = time.monotonic() + duration + 3
    stop = threading.Event()

    def drive() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            subprocess.run(
                _load_command(load, url, api_key, deadline - time.monotonic(), load_core,
                              streams, connections),
                env={**os.environ, "BENCH_API_KEY": api_key}, capture_output=True,
                check=False, timeout=duration + 60, cwd=Path(__file__).resolve().parent.parent,
            )

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    time.sleep(1)
    try:
        subprocess.run(
            pinned([venv_script("py-spy"), "record", "--pid", str(pid), "--duration",
                    str(round(duration)), "--rate", str(rate), "--format", form, "--idle",
                    "--threads", "-o", str(output)], load_core),
            check=True, capture_output=True, timeout=duration + 60,
        )
    finally:
        stop.set()
        driver.join(duration + 90)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds sampled")
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--load", choices=("plain", "streams"), default="plain",
                        help="wrk plain requests, or rounds of concurrent SSE streams")
    parser.add_argument("--streams", type=int, default=500, help="streams per round")
    parser.add_argument("--connections", type=int, default=64,
                        help="wrk's concurrency for the plain load (1 for the latency target)")
    parser.add_argument("--svg", type=Path, help="also record a flame graph here")
    parser.add_argument("--raw", type=Path, help="keep the collapsed stacks here")
    parser.add_argument("--markdown", type=Path, help="write the tables here")
    args = parser.parse_args()
    for tool in ("wrk", venv_script("py-spy")):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed (apt-get install -y wrk; .venv/bin/pip install py-spy)")
    two_cores = cores() >= 2
    proxy_core, load_core = (0, 1) if two_cores else (None, None)
    root = Path(tempfile.mkdtemp(prefix="llamaproxy-profile-"))
    servers = []
    try:
        backend = start_backend(root, Plan(), load_core)
        servers.append(backend)
        gateway = start_gateway(root, backend.url, proxy_core)
        servers.append(gateway)
        subprocess.run(  # warm-up
            pinned(["wrk", "-t1", "-c64", "-d2s", "-s", str(LUA), gateway.url + PATH], load_core),
            env={**os.environ, "BENCH_API_KEY": gateway.api_key or ""}, capture_output=True,
            check=False, timeout=60,
        )
        raw_path = args.raw or root / "profile.txt"
        record(gateway.process.pid, gateway.url, gateway.api_key or "", args.duration, args.rate,
               raw_path, "raw", load_core, args.load, args.streams, args.connections)
        if args.svg:
            record(gateway.process.pid, gateway.url, gateway.api_key or "", args.duration,
                   args.rate, args.svg, "flamegraph", load_core, args.load, args.streams,
                   args.connections)
        text = report(raw_path.read_text(), args.rate, args.duration)
    finally:
        for server in reversed(servers):
            server.process.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
