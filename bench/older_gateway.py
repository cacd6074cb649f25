"""The older stdlib gateway as a comparison target of the overhead harness.

The older gateway is ``scripts/gateway.py`` (with ``scripts/auth.py``) of the public repository
zepfu/llama-gguf-inference. That repository has no licence file, so nothing of it is copied into
this project: the harness is given the path of an export (``--older-gateway PATH`` or
``BENCH_OLDER_GATEWAY``) and runs ``PATH/scripts/gateway.py`` with the harness's own interpreter
(both files import only the standard library), configured through the environment variables its
source reads: ``PORT``, ``BACKEND_HOST``/``PORT_BACKEND``, ``AUTH_ENABLED`` with
``AUTH_KEYS_FILE`` (lines of ``key_id:api_key``), ``MAX_REQUESTS_PER_MINUTE``,
``MAX_CONCURRENT_REQUESTS``, ``MAX_QUEUE_SIZE`` and ``LOG_FORMAT``.

Its access log goes to the hard-coded ``/data/logs/api_access.log``. Where possible it runs in a
private mount namespace (``unshare --mount``) with the run's own directory bound on ``/data``, so
nothing is written outside the run (``/data`` must exist as a mount point: when it does not and
the harness may create it, it creates the empty directory and says so). Without that, it uses
``/data/logs`` when it is writable; otherwise it runs without its access log (every request then
prints a warning instead) and the report says its numbers are not comparable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Process, free_port, http_status, pinned, wait_until

#: Where the older gateway writes its access log (hard-coded in its auth.py).
DATA = Path("/data")
ACCESS_LOG = Path("logs") / "api_access.log"
#: What ``sh -c`` runs in the private mount namespace: bind ``$0`` on /data, then the gateway.
_BIND_AND_EXEC = 'mount --bind "$0" /data && exec "$@"'


def script(export: Path) -> Path:
    """``scripts/gateway.py`` of an export; ValueError when it is not there."""
    path = Path(export) / "scripts" / "gateway.py"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: --older-gateway wants the root of an export of "
                         "zepfu/llama-gguf-inference (the directory holding scripts/gateway.py)")
    if not (path.parent / "auth.py").is_file():
        raise ValueError(f"{path.parent / 'auth.py'} does not exist: without it the older "
                         "gateway runs with authentication off")
    return path


@dataclass
class DataDirectory:
    """How the older gateway gets a writable ``/data``: the command prefix, where its access log
    ends up, and what the report should say about it."""

    prefix: list[str] = field(default_factory=list)
    access_log: Path | None = None
    notes: list[str] = field(default_factory=list)


def _private_mount_works(source: Path) -> bool:
    probe = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _BIND_AND_EXEC,
             str(source), "true"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def data_directory(run_dir: Path) -> DataDirectory:
    """Choose how ``/data/logs`` is made writable for the older gateway (see the module doc)."""
    source = run_dir / "data"
    (source / "logs").mkdir(parents=True, exist_ok=True)
    notes = []
    if shutil.which("unshare") is not None:
        if not DATA.exists():
            try:
                DATA.mkdir()
                notes.append(f"created the empty directory {DATA} as the mount point of the older "
                             "gateway's private /data (nothing is written in it)")
            except OSError:
                pass
        if DATA.is_dir() and _private_mount_works(source):
            return DataDirectory(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", _BIND_AND_EXEC,
                 str(source)],
                source / ACCESS_LOG,
                [*notes, f"the older gateway ran in a private mount namespace with {source} on "
                 f"{DATA}: its access log was written there"],
            )
    logs = DATA / ACCESS_LOG.parent
    try:
        logs.mkdir(parents=True, exist_ok=True)
        writable = os.access(logs, os.W_OK)
    except OSError:
        writable = False
    if writable:
        return DataDirectory([], DATA / ACCESS_LOG, [
            *notes, "no private mount namespace: the older gateway appended its access log to "
            f"the real {DATA / ACCESS_LOG}"])
    return DataDirectory([], None, [
        *notes, f"{DATA / ACCESS_LOG.parent} is not writable and no private mount namespace "
        "could be made (unshare --mount needs root or CAP_SYS_ADMIN): the older gateway ran "
        "without its access log and printed a warning per request instead, so its figures are "
        "not comparable"])


def environment(run_dir: Path, port: int, backend_port: int, api_key: str) -> dict[str, str]:
    """Its environment: auth on with a one-key file, limits out of the way, JSON logs."""
    keys = run_dir / "older_api_keys.txt"
    keys.write_text(f"# bench\nbench:{api_key}\n")
    return {
        **os.environ,
        "PORT": str(port),
        "BACKEND_HOST": "127.0.0.1",
        "PORT_BACKEND": str(backend_port),
        "DATA_DIR": str(run_dir / "data"),
        "AUTH_ENABLED": "true",
        "AUTH_KEYS_FILE": str(keys),
        "MAX_REQUESTS_PER_MINUTE": "1000000000",
        "MAX_CONCURRENT_REQUESTS": "1024",
        "MAX_QUEUE_SIZE": "0",
        "LOG_FORMAT": "json",
    }


def start(export: Path, run_dir: Path, backend_port: int, api_key: str, python: str,
          core: int | None, wrapper: Sequence[str] = (), ready_timeout: float = 20.0,
          ) -> tuple[Process, int, DataDirectory]:
    """Run the older gateway in front of the backend; wait until ``/ping`` answers.

    ``wrapper`` goes before the Python command (e.g. valgrind, :mod:`bench.instructions`).
    Returns the process, its port and how its ``/data`` was arranged."""
    path = script(export)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = data_directory(run_dir)
    port = free_port()
    command = pinned([*data.prefix, *wrapper, python, str(path)], core)
    process = Process("older gateway", command, run_dir / "older_gateway.out",
                      env=environment(run_dir, port, backend_port, api_key), cwd=path.parent)
    wait_until(lambda: http_status(port, "/ping") == 200, ready_timeout,
               "the older gateway's /ping", process)
    return process, port, data
