"""HTTPS end to end: the real gateway with TLS_CERT_FILE and TLS_KEY_FILE, openai client, reload."""

from __future__ import annotations

import signal
import socket
import ssl
import tempfile
import threading

import httpx
import openai
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.harness import API_KEY, Gateway, wait_for
from tests.tls_certs import make_ca, make_server_cert, write_ca, write_pem_files

PROMPT = [{"role": "user", "content": "Say hello"}]


def peer_serial(port: int, ca_file: str) -> int:
    """The serial number of the certificate a new TLS connection is shown."""
    context = ssl.create_default_context(cafile=ca_file)
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


class TLSTests(SynchronousTestCase):
    def test_https_with_the_openai_client_and_a_reload_under_a_stream(self) -> None:
        directory = tempfile.mkdtemp(prefix="llamaproxy-e2e-tls-")
        ca = make_ca()
        ca_file = write_ca(directory, ca)
        files = write_pem_files(directory, make_server_cert(ca, serial=1001))
        gateway = Gateway(env={"TLS_CERT_FILE": files.cert_file, "TLS_KEY_FILE": files.key_file,
                               "HSTS_MAX_AGE": "3600", "PARALLEL": "2"})
        url = f"https://localhost:{gateway.port}"
        gateway.start(wait_ready=False)
        self.addCleanup(gateway.stop)
        # The health site stays plain HTTP for platform probes.
        wait_for(lambda: _ok(f"http://127.0.0.1:{gateway.health_port}/readyz"), 60, "readiness")
        http = httpx.Client(verify=ca_file, timeout=60)
        self.addCleanup(http.close)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, http_client=http,
                               max_retries=0)
        whole = client.chat.completions.create(
            model="tiny", messages=PROMPT, max_tokens=12, temperature=0  # type: ignore[arg-type]
        )
        parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", messages=PROMPT, max_tokens=12, temperature=0, stream=True,  # type: ignore[arg-type]
        ) if c.choices]
        self.assertEqual("".join(parts), whole.choices[0].message.content)
        response = http.get(f"{url}/ping")
        self.assertEqual(response.headers["strict-transport-security"], "max-age=3600")
        self.assertEqual(peer_serial(gateway.port, ca_file), 1001)

        # A stream is running while the certificate is renewed and SIGHUP arrives.
        result: dict[str, object] = {}
        started = threading.Event()

        def stream() -> None:
            chunks = []
            for chunk in client.completions.create(
                model="tiny", prompt="Hello", max_tokens=3000, temperature=0, stream=True
            ):
                started.set()
                chunks.append(chunk)
            result["finish"] = chunks[-1].choices[0].finish_reason if chunks[-1].choices else None

        thread = threading.Thread(target=stream)
        thread.start()
        self.assertTrue(started.wait(30))
        renewed = write_pem_files(directory, make_server_cert(ca, serial=2002))
        self.assertEqual(renewed.cert_file, files.cert_file)
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGHUP)
        wait_for(lambda: peer_serial(gateway.port, ca_file) == 2002, 10, "the renewed certificate")
        thread.join(60)
        self.assertEqual(result.get("finish"), "length")

    def test_plain_http_is_not_spoken_on_the_tls_port(self) -> None:
        directory = tempfile.mkdtemp(prefix="llamaproxy-e2e-tls-")
        ca = make_ca()
        files = write_pem_files(directory, make_server_cert(ca))
        gateway = Gateway(env={"TLS_CERT_FILE": files.cert_file, "TLS_KEY_FILE": files.key_file})
        gateway.start(wait_ready=False)
        self.addCleanup(gateway.stop)
        wait_for(lambda: _ok(f"http://127.0.0.1:{gateway.health_port}/readyz"), 60, "readiness")
        with self.assertRaises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{gateway.port}/ping", timeout=5)

    def test_a_mismatched_key_is_a_startup_error_naming_the_file(self) -> None:
        directory = tempfile.mkdtemp(prefix="llamaproxy-e2e-tls-")
        ca = make_ca()
        files = write_pem_files(directory, make_server_cert(ca, key_index=0))
        other = write_pem_files(directory, make_server_cert(ca, key_index=1), prefix="other")
        gateway = Gateway(env={"TLS_CERT_FILE": files.cert_file, "TLS_KEY_FILE": other.key_file})
        gateway.start(wait_ready=False)
        self.addCleanup(gateway.stop)
        assert gateway.process is not None
        self.assertNotEqual(gateway.process.wait(30), 0)
        self.assertIn(other.key_file, gateway.output())


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
