"""A real ``redis-server`` for tests: Debian's package on a free loopback port, nothing saved.

Skipped when redis-server is not installed (scripts/setup.sh installs it), unless
``LLAMAPROXY_REQUIRE_E2E=1`` (scripts/test.sh, CI), where that is a failure.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

from twisted.trial.unittest import SkipTest

from llamaproxy.state.url import StateURL, parse_state_url


def redis_server_binary() -> str:
    """The redis-server binary, or SkipTest (a failure under LLAMAPROXY_REQUIRE_E2E)."""
    import os

    found = shutil.which("redis-server")
    if found is None:
        if os.environ.get("LLAMAPROXY_REQUIRE_E2E") == "1":
            raise AssertionError("redis-server is required (apt-get install redis-server)")
        raise SkipTest("redis-server is not installed")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process on 127.0.0.1 with its own temporary directory."""

    def __init__(
        self, password: str | None = None, tls: tuple[str, str] | None = None,
        persistent: bool = False,
    ) -> None:
        self.binary = redis_server_binary()
        #: Keep data across restarts (append-only file, fsync on every write), as in production.
        self.persistent = persistent
        self.port = _free_port()
        self.password = password
        #: (certificate file, key file): serve TLS only (rediss://) with this certificate.
        self.tls = tls
        self.dir = tempfile.mkdtemp(prefix="llamaproxy-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}localhost:{self.port}/0"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def state_url(self) -> StateURL:
        parsed = parse_state_url(self.url)
        assert parsed is not None
        return parsed

    def start(self) -> RedisServer:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always",
            "--dir", self.dir, "--daemonize", "no",
        ]
        if self.tls:
            cert, key = self.tls
            args += [
                "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert,
                "--tls-key-file", key, "--tls-auth-clients", "no",
            ]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.02)
        raise AssertionError("redis-server did not start listening")

    def stop(self) -> None:
        """Stop the server (it can be started again on the same port, empty)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def command(self, *args: str) -> str:
        """Run one redis-cli-like command through a raw socket-free path: redis-cli."""
        cli = shutil.which("redis-cli") or "redis-cli"
        auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
        out = subprocess.run(
            [cli, "-p", str(self.port), *auth, *args], capture_output=True, check=True, timeout=10
        )
        return out.stdout.decode().strip()
