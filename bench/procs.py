"""Processes for the benchmarks: start pinned to a core, watch CPU and memory in /proc, stop.

Every process is started with ``PR_SET_PDEATHSIG`` (it gets SIGTERM if the harness dies), in its
own process group, and is stopped with SIGTERM then SIGKILL by the harness itself: nothing is left
behind, and nothing but our own children is ever signalled.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def venv_script(name: str) -> str:
    """A console script of the running interpreter's environment (else from PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def cores() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def pinned(command: Sequence[str], core: int | None) -> list[str]:
    """``command`` under ``taskset -c core`` (unchanged when not pinning or taskset is absent)."""
    if core is None or shutil.which("taskset") is None or core >= (os.cpu_count() or 1):
        return list(command)
    return ["taskset", "-c", str(core), *command]


def _child_setup() -> None:
    """In the child before exec: die with the harness, and allow many open files."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    with contextlib.suppress(Exception):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Process:
    """One child process of the harness, its output in a log file."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.popen = subprocess.Popen(
            self.command,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_child_setup,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.popen.pid

    def alive(self) -> bool:
        """True while it runs."""
        return self.popen.poll() is None

    def output(self, last: int = 3000) -> str:
        """The end of its log."""
        try:
            return self.log_path.read_text(errors="replace")[-last:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` s; returns the exit code."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


def _stat_fields(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and its children (nginx: the master and its workers)."""
    return [pid, *children(pid)]


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (utime + stime from /proc/<pid>/stat)."""
    return sum(cpu_user_system(pids))


def cpu_user_system(pids: Sequence[int]) -> tuple[float, float]:
    """User and system CPU seconds used so far by ``pids`` (utime, stime: fields 14 and 15)."""
    user = system = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = _stat_fields(pid)
            user += int(fields[11])
            system += int(fields[12])
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def cpu_since(pids: Sequence[int], before: tuple[float, float]) -> tuple[float, float]:
    """(user + system, system) CPU seconds used by ``pids`` since ``before``, a reading of
    :func:`cpu_user_system`."""
    user, system = cpu_user_system(pids)
    return user - before[0] + system - before[1], system - before[1]


def memory_kib(pids: Sequence[int], field: str = "VmRSS") -> int:
    """Sum of ``field`` (VmRSS, VmHWM) in KiB over ``pids`` (from /proc/<pid>/status)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
    return total


def machine_busy_percent(seconds: float = 1.0) -> float:
    """How busy all CPUs were over the next ``seconds`` (from /proc/stat), in % of the machine:
    anything above a few % before a run means someone else is using the cores."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    total_before, idle_before = sample()
    time.sleep(seconds)
    total_after, idle_after = sample()
    total = total_after - total_before
    return 0.0 if total <= 0 else (1 - (idle_after - idle_before) / total) * 100


def wait_quiet(timeout: float, threshold: float = 10.0) -> float:
    """Wait up to ``timeout`` s for the machine to be less than ``threshold`` % busy (measured
    over 2 s); returns the last measurement."""
    deadline = time.monotonic() + timeout
    busy = machine_busy_percent(2.0)
    while busy >= threshold and time.monotonic() < deadline:
        busy = machine_busy_percent(2.0)
    return busy


def http_status(
    port: int, path: str, timeout: float = 2.0, method: str = "GET", body: bytes | None = None
) -> int | None:
    """Status of METHOD http://127.0.0.1:port/path, or None when nothing answers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def wait_until(
    predicate: object, timeout: float, what: str, process: Process | None = None
) -> None:
    """Poll ``predicate()`` every 50 ms; RuntimeError after ``timeout`` s or if ``process`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited early:\n{process.output()}")
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    detail = f":\n{process.output()}" if process is not None else ""
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}{detail}")


def _first_line(command: Sequence[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "absent"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine() -> dict[str, str | int]:
    """The facts a benchmark result depends on."""
    import twisted

    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count() or 0,
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "nginx": _first_line(["nginx", "-v"]) if shutil.which("nginx") else "absent",
        "wrk": _first_line(["wrk", "-v"]) if shutil.which("wrk") else "absent",
    }
