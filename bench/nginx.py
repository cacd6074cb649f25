"""nginx as the reference reverse proxy: a generated config, run in the foreground on loopback.

One worker process (the comparison is one core against one core), ``proxy_buffering off`` (SSE
must flow), HTTP/1.1 with an upstream keep-alive pool, an access log with a buffer (llamaproxy
logs every request too). Everything nginx writes goes to the run's temporary directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from bench.procs import Process, http_status, pinned, wait_until

CONFIG = """\
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
worker_rlimit_nofile 65536;
{user}
events {{
    worker_connections 16384;
    multi_accept on;
}}

http {{
    access_log {root}/access.log combined buffer=64k flush=1s;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;

    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive 1024;
        keepalive_requests 1000000;
    }}

    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def available() -> bool:
    """True when an nginx binary is on PATH (Debian: ``apt-get install -y nginx``)."""
    return shutil.which("nginx") is not None


def write_config(root: Path, port: int, backend_port: int) -> Path:
    """Write nginx.conf for a proxy on ``port`` in front of ``backend_port``; returns its path."""
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (root / name).mkdir(parents=True, exist_ok=True)
    # Started as root, nginx's workers would switch to "nobody" and lose the temp directory.
    user = "user root;" if os.geteuid() == 0 else ""
    path = root / "nginx.conf"
    path.write_text(CONFIG.format(root=root, port=port, backend_port=backend_port, user=user))
    return path


def start(root: Path, port: int, backend_port: int, core: int | None) -> Process:
    """Run nginx in the foreground (``daemon off``) and wait until it proxies /health."""
    root.mkdir(parents=True, exist_ok=True)
    config = write_config(root, port, backend_port)
    command = ["nginx", "-p", str(root), "-c", str(config), "-e", str(root / "error.log")]
    process = Process("nginx", pinned(command, core), root / "nginx.out")
    wait_until(lambda: http_status(port, "/health") == 200, 10, "nginx", process)
    return process
