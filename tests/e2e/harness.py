"""Running the real `twistd llamaproxy` with a real llama-server on a tiny generated model.

``Gateway`` starts ``twistd -n --pidfile= llamaproxy`` as a subprocess on free ports, with a key
file and its own data, key and log directories, waits until ``/readyz`` says ready, and stops it
with SIGTERM. When no llama-server binary can be found the tests are skipped, unless
``LLAMAPROXY_REQUIRE_E2E=1`` (set by scripts/test.sh and CI), where that is a failure.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
from twisted.trial.unittest import SkipTest

from llamaproxy.config import ConfigError
from llamaproxy.supervision.llama_server import find_llama_server
from tests.e2e.tiny_model import write_tiny_model

API_KEY = "sk-e2e-test-key-0123456789abcdef"
_model_dir = tempfile.mkdtemp(prefix="llamaproxy-e2e-model-")
atexit.register(shutil.rmtree, _model_dir, True)
_model_path: str | None = None


def llama_server_binary() -> str:
    """The llama-server the e2e tests use, or SkipTest (a failure under LLAMAPROXY_REQUIRE_E2E)."""
    try:
        return find_llama_server(None, os.environ)
    except ConfigError as e:
        if os.environ.get("LLAMAPROXY_REQUIRE_E2E") == "1":
            raise AssertionError(f"end-to-end tests required but: {e}") from None
        raise SkipTest(f"no llama-server: {e}") from None


def tiny_model() -> str:
    """Path of the tiny GGUF, written once per test run."""
    global _model_path
    if _model_path is None:
        _model_path = write_tiny_model(os.path.join(_model_dir, "tiny.gguf"))
    return _model_path


#: Ports already handed out by ``free_port`` in this test run.
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port nothing listens on right now, and never one handed out before in this run:
    the kernel may give the same free port to two binds in a row, and a gateway whose child
    got its own port (seen: "Address already in use" at start) fails."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def twistd() -> str:
    """The twistd script of the running interpreter's environment."""
    candidate = Path(sys.executable).parent / "twistd"
    return str(candidate) if candidate.exists() else "twistd"


def children_of(pid: int) -> list[int]:
    """Direct child process ids of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(predicate: object, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate()`` until true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


_shared: Gateway | None = None


def shared_gateway() -> Gateway:
    """One gateway for tests that do not change it, started on first use, stopped at exit."""
    global _shared
    if _shared is None or _shared.process is None or _shared.process.poll() is not None:
        _shared = Gateway().start()
        atexit.register(_shared.stop)
    return _shared


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the test runner dies, so nothing is orphaned."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Gateway:
    """One real `twistd llamaproxy` process and the directories it uses."""

    def __init__(self, env: Mapping[str, str] | None = None, auth: bool = True) -> None:
        self.binary = llama_server_binary()
        self.root = Path(tempfile.mkdtemp(prefix="llamaproxy-e2e-"))
        self.port = free_port()
        self.health_port = free_port()
        self.backend_port = free_port()
        self.keys_file = self.root / "api_keys.txt"
        self.keys_file.write_text(f"# e2e keys\ntester:{API_KEY}\n")
        self.log_path = self.root / "twistd.log"
        self.instance_id = f"e2e-{self.port}"
        self.env = {
            **os.environ,
            "LLAMA_SERVER": self.binary,
            "MODEL_PATH": tiny_model(),
            "MODEL_ALIAS": "tiny",
            "PORT": str(self.port),
            "PORT_HEALTH": str(self.health_port),
            "PORT_BACKEND": str(self.backend_port),
            "HOST": "127.0.0.1",
            "DATA_DIR": str(self.root),
            "AUTH_ENABLED": "true" if auth else "false",
            "AUTH_KEYS_FILE": str(self.keys_file),
            "BACKEND_KEY_DIR": str(self.root / "keys"),
            "INSTANCE_ID": self.instance_id,
            "CTX": "4096",
            "NGL": "0",
            "THREADS": "1",
            "PARALLEL": "1",
            "BACKOFF_MAX": "2",
            # Tests read llama-server's per-request lines (tasks launched, cancelled): log them
            # (by default they are debug, not written).
            "CHILD_REQUEST_LOG_LEVEL": "info",
            # The scenario suite runs twice in CI: fast paths on (auto) and off (stock Twisted).
            "FAST_PATHS": os.environ.get("LLAMAPROXY_TEST_FAST_PATHS", "auto"),
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend_url(self) -> str:
        return f"http://127.0.0.1:{self.backend_port}"

    def key_files(self) -> list[Path]:
        """This gateway's backend key files (``backend-INSTANCE_ID.BOOT.PID.TOKEN.key``)."""
        return sorted((self.root / "keys").glob(f"backend-{self.instance_id}.*.key"))

    def backend_key(self) -> str:
        [path] = self.key_files()
        return path.read_text().strip()

    def start(self, wait_ready: bool = True) -> Gateway:
        self.process = subprocess.Popen(
            [twistd(), "-n", "--pidfile=", "--logfile", str(self.log_path), "llamaproxy"],
            env=self.env,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited {self.process.returncode}:\n{self.output()}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout, "the gateway to be ready")

    def health(self) -> dict[str, object]:
        return httpx.get(f"{self.url}/health", timeout=5).json()  # type: ignore[no-any-return]

    def child_pid(self) -> int:
        assert self.process is not None
        kids = [p for p in children_of(self.process.pid) if alive(p)]
        assert len(kids) == 1, f"expected one llama-server child, found {kids}"
        return kids[0]

    def access_log(self) -> list[list[str]]:
        """The access log's lines (text format), each split into its ``|`` fields."""
        try:
            text = (self.root / "logs" / "api_access.log").read_text()
        except OSError:
            return []
        return [line.split(" | ") for line in text.splitlines() if line]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def output(self) -> str:
        out = ""
        process = self.process
        if process is not None and process.stdout is not None and process.poll() is not None:
            out = process.stdout.read().decode(errors="replace")
        return out + self.log_text()[-5000:]

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM twistd, wait for it, remove its directories; returns its exit code."""
        code = self.terminate(timeout)
        shutil.rmtree(self.root, ignore_errors=True)
        return code

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM twistd and wait for it (its files stay); returns its exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f"twistd did not exit within {timeout}s:\n{self.output()}"
                ) from None
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode
