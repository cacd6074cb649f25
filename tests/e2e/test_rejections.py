"""The real twistd under a flood of wrong keys: its own log stays small (issue 24.3).

Every rejection is in the access log (with its bytes and time to first byte, 24.4) and in the
metrics; the gateway's log gets a summary line per reason per minute, not a line per request.
"""

from __future__ import annotations

import socket

from twisted.trial.unittest import TestCase

from tests.e2e.harness import Gateway, free_port, wait_for

FLOOD = 10_000
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-wrong-key-"
    b"0000000000000000000000\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n"
    b'{"messages": []}'
)


def send_raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


class RejectionFloodTests(TestCase):
    def test_bad_keys_do_not_fill_the_gateway_log(self) -> None:
        # No backend is needed to refuse a key: an external one that is not even there.
        gw = Gateway(env={"BACKEND_URL": f"http://127.0.0.1:{free_port()}"})
        self.addCleanup(gw.stop)
        gw.start(wait_ready=False)
        wait_for(lambda: "unreachable" in gw.log_text() or "Monitoring" in gw.log_text(), 30,
                 "the gateway to start")
        wait_for(lambda: _answers(gw.port), 30, "the gateway to listen")
        before = len(gw.log_text().splitlines())
        for _ in range(FLOOD):
            answer = send_raw(gw.port, REQUEST)
            assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        wait_for(lambda: len(gw.access_log()) >= FLOOD, 30, "the access log")
        grown = len(gw.log_text().splitlines()) - before
        self.assertLessEqual(grown, 3, gw.log_text()[-3000:])
        lines = [fields for fields in gw.access_log() if "401" in fields]
        self.assertGreaterEqual(len(lines), FLOOD)
        sample = " | ".join(lines[-1])
        self.assertNotIn("bytes=0", sample)
        self.assertNotIn("ttfb=-", sample)


def _answers(port: int) -> bool:
    try:
        return send_raw(port, b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") \
            .startswith(b"HTTP/1.1 200")
    except OSError:
        return False
