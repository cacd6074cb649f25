"""Tests for llamaproxy.tls: validation, the cipher/version/ALPN policy on a real socket, reload.

Certificates are generated per test run (tests/tls_certs.py). Loading and reload logic run as
``SynchronousTestCase`` with a ``Clock``; the policy and the reload-under-a-live-stream behaviour
run a real TLS listener on 127.0.0.1 with the real reactor and real OpenSSL clients.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec
from OpenSSL import SSL
from twisted.internet import reactor as _global_reactor
from twisted.internet.address import IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IHandshakeListener,
    IListeningPort,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import Certificate
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, readBody
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from llamaproxy.gateway.site import GatewaySite
from llamaproxy.tls import (
    CIPHERS,
    EXPIRY_WARNING_SECONDS,
    CertificateWatcher,
    HardenedCertificateOptions,
    ReloadingContextFactory,
    TLSConfigError,
    TLSSettings,
    hsts_header,
    load_certificate_options,
    tls_server_endpoint,
)
from tests.tls_certs import (
    DAY,
    CertAndKey,
    PemFiles,
    make_ca,
    make_expired_cert,
    make_expiring_cert,
    make_server_cert,
    rsa_key,
    utc_now,
    write_ca,
    write_file,
    write_pem_files,
)

reactor: Any = _global_reactor


def _now_clock() -> Clock:
    clock = Clock()
    clock.advance(utc_now().timestamp())
    return clock


def _pem_block(label: bytes) -> bytes:
    """A PEM block with the right armour around a body that is not DER of anything."""
    return b"-----BEGIN %s-----\nAAAA\n-----END %s-----\n" % (label, label)


def _messages(events: Sequence[dict[str, Any]], level: LogLevel) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_level") == level]


class _Fixture:
    """A CA and a temporary directory for PEM files."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.dir = test.mktemp()
        os.makedirs(self.dir)
        self.ca = make_ca()
        self.ca_file = write_ca(self.dir, self.ca)

    def files(self, server: CertAndKey, **kwargs: Any) -> PemFiles:
        return write_pem_files(self.dir, server, **kwargs)

    def settings(self, server: CertAndKey, **kwargs: Any) -> TLSSettings:
        files = self.files(server, **kwargs)
        return TLSSettings(files.cert_file, files.key_file, files.chain_file)


class HSTSTests(SynchronousTestCase):
    """The Strict-Transport-Security value."""

    def test_values(self) -> None:
        self.assertEqual(hsts_header(31536000), "max-age=31536000")
        self.assertEqual(
            hsts_header(300, include_subdomains=True), "max-age=300; includeSubDomains"
        )
        self.assertEqual(hsts_header(0), "max-age=0")

    def test_negative_refused(self) -> None:
        self.assertRaises(ValueError, hsts_header, -1)


class SettingsTests(SynchronousTestCase):
    """TLSSettings validation."""

    def test_min_version(self) -> None:
        self.assertEqual(TLSSettings("c", "k", min_version="1.3").min_version, "1.3")
        for bad in ("1.1", "1.0", "tls1.2", ""):
            e = self.assertRaises(TLSConfigError, TLSSettings, "c", "k", min_version=bad)
            self.assertIn(repr(bad), str(e))

    def test_files_required(self) -> None:
        e = self.assertRaises(TLSConfigError, TLSSettings, "", "k")
        self.assertIn("certificate file is not set", str(e))
        e = self.assertRaises(TLSConfigError, TLSSettings, "c", " ")
        self.assertIn("key file is not set", str(e))

    def test_paths(self) -> None:
        self.assertEqual(TLSSettings("c", "k").paths, ("c", "k"))
        self.assertEqual(TLSSettings("c", "k", "ch").paths, ("c", "k", "ch"))


class LoadTests(SynchronousTestCase):
    """load_certificate_options: a good set loads; every bad one names its file and the reason."""

    def setUp(self) -> None:
        self.fx = _Fixture(self)
        self.events = EventLoggingObserver.createWithCleanup(
            cast(TestCase, self), globalLogPublisher
        )

    def assertLoadError(self, settings: TLSSettings, *fragments: str) -> str:
        e = self.assertRaises(TLSConfigError, load_certificate_options, settings)
        for fragment in fragments:
            self.assertIn(fragment, str(e))
        return str(e)

    def test_good(self) -> None:
        settings = self.fx.settings(make_server_cert(self.fx.ca))
        options = load_certificate_options(settings)
        self.assertIsInstance(options, HardenedCertificateOptions)
        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, options))

    def test_cipher_string_has_no_static_rsa(self) -> None:
        options = load_certificate_options(self.fx.settings(make_server_cert(self.fx.ca)))
        ciphers = SSL.Connection(options.getContext(), None).get_cipher_list()
        self.assertTrue(ciphers)
        for name in ciphers:
            # TLS 1.3 suites (TLS_*) are all ECDHE/DHE; TLS 1.2 ones here must be ECDHE + AEAD.
            if not name.startswith("TLS_"):
                self.assertTrue(name.startswith("ECDHE-"), name)
                self.assertTrue("GCM" in name or "CHACHA20" in name, name)
        self.assertEqual(CIPHERS, "ECDHE+AESGCM:ECDHE+CHACHA20")

    def test_missing_key_file(self) -> None:
        files = self.fx.files(make_server_cert(self.fx.ca))
        missing = os.path.join(self.fx.dir, "nope-key.pem")
        self.assertLoadError(
            TLSSettings(files.cert_file, missing), f"TLS key file {missing}", "No such file"
        )

    def test_missing_cert_file(self) -> None:
        files = self.fx.files(make_server_cert(self.fx.ca))
        missing = os.path.join(self.fx.dir, "nope.pem")
        self.assertLoadError(
            TLSSettings(missing, files.key_file), f"TLS certificate file {missing}", "No such file"
        )

    def test_garbage_cert(self) -> None:
        files = self.fx.files(make_server_cert(self.fx.ca))
        write_file(files.cert_file, b"hello, I am not a certificate\n")
        self.assertLoadError(
            TLSSettings(files.cert_file, files.key_file),
            f"TLS certificate file {files.cert_file}", "no PEM certificate",
        )

    def test_corrupt_pem_body(self) -> None:
        files = self.fx.files(make_server_cert(self.fx.ca))
        write_file(files.cert_file, _pem_block(b"CERTIFICATE"))
        self.assertLoadError(
            TLSSettings(files.cert_file, files.key_file),
            f"TLS certificate file {files.cert_file}", "not a valid PEM certificate",
        )

    def test_der_cert_hint(self) -> None:
        server = make_server_cert(self.fx.ca)
        files = self.fx.files(server)
        write_file(files.cert_file, server.cert.public_bytes(serialization.Encoding.DER))
        self.assertLoadError(
            TLSSettings(files.cert_file, files.key_file), files.cert_file,
            "openssl x509 -inform der",
        )

    def test_garbage_key(self) -> None:
        files = self.fx.files(make_server_cert(self.fx.ca))
        write_file(files.key_file, _pem_block(b"PRIVATE KEY"))
        self.assertLoadError(
            TLSSettings(files.cert_file, files.key_file),
            f"TLS key file {files.key_file}", "not a valid PEM private key",
        )

    def test_swapped_files(self) -> None:
        files = self.fx.files(make_server_cert(self.fx.ca))
        self.assertLoadError(
            TLSSettings(files.key_file, files.cert_file),
            f"TLS certificate file {files.key_file}", "swapped",
        )

    def test_certificate_as_key(self) -> None:
        files = self.fx.files(make_server_cert(self.fx.ca))
        self.assertLoadError(
            TLSSettings(files.cert_file, files.cert_file),
            f"TLS key file {files.cert_file}", "no PEM private key", "swapped",
        )

    def test_dsa_key_refused(self) -> None:
        server = make_server_cert(self.fx.ca)
        files = self.fx.files(server, key=dsa.generate_private_key(2048))
        self.assertLoadError(
            TLSSettings(files.cert_file, files.key_file), f"TLS key file {files.key_file}",
            "unsupported key type",
        )

    def test_encrypted_key(self) -> None:
        server = make_server_cert(self.fx.ca)
        files = self.fx.files(server)
        write_file(files.key_file, server.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ))
        self.assertLoadError(
            TLSSettings(files.cert_file, files.key_file), f"TLS key file {files.key_file}",
            "passphrase",
        )

    def test_mismatched_key(self) -> None:
        server = make_server_cert(self.fx.ca, serial=0xABC)
        settings = self.fx.settings(server, key=rsa_key(1))
        self.assertLoadError(
            settings, f"TLS key file {settings.key_file}", "does not match",
            settings.cert_file, "serial ABC",
        )

    def test_expired_refused(self) -> None:
        settings = self.fx.settings(make_expired_cert(self.fx.ca))
        self.assertLoadError(settings, f"TLS certificate file {settings.cert_file}", "expired")

    def test_not_yet_valid_refused(self) -> None:
        now = utc_now()
        settings = self.fx.settings(
            make_server_cert(self.fx.ca, not_before=now + DAY, not_after=now + 90 * DAY)
        )
        self.assertLoadError(settings, settings.cert_file, "not valid before")

    def test_validity_checked_at_given_time(self) -> None:
        server = make_server_cert(self.fx.ca)
        settings = self.fx.settings(server)
        later = server.cert.not_valid_after_utc.timestamp() + 1
        e = self.assertRaises(TLSConfigError, load_certificate_options, settings, later)
        self.assertIn("expired", str(e))

    def test_chain_file(self) -> None:
        intermediate = make_ca("llamaproxy test intermediate", issuer=self.fx.ca)
        server = make_server_cert(intermediate)
        settings = self.fx.settings(server, chain=[intermediate.cert, self.fx.ca.cert])
        load_certificate_options(settings)

    def test_fullchain_in_cert_file_and_repeated_in_chain_file(self) -> None:
        intermediate = make_ca("llamaproxy test intermediate", issuer=self.fx.ca)
        server = make_server_cert(intermediate)
        files = self.fx.files(server, chain=[intermediate.cert])
        fullchain = server.cert_pem + intermediate.cert_pem
        write_file(files.cert_file, fullchain)
        load_certificate_options(TLSSettings(files.cert_file, files.key_file))
        load_certificate_options(TLSSettings(files.cert_file, files.key_file, files.chain_file))

    def test_broken_chain(self) -> None:
        intermediate = make_ca("llamaproxy test intermediate", issuer=self.fx.ca)
        other = make_ca("some other CA")
        server = make_server_cert(intermediate)
        settings = self.fx.settings(server, chain=[other.cert])
        self.assertLoadError(
            settings, f"TLS chain file {settings.chain_file}", "broken chain", "some other CA"
        )

    def test_chain_out_of_order(self) -> None:
        intermediate = make_ca("llamaproxy test intermediate", issuer=self.fx.ca)
        server = make_server_cert(intermediate)
        settings = self.fx.settings(server, chain=[self.fx.ca.cert, intermediate.cert])
        self.assertLoadError(settings, f"TLS chain file {settings.chain_file}", "broken chain")

    def test_garbage_chain(self) -> None:
        server = make_server_cert(self.fx.ca)
        files = self.fx.files(server)
        chain = write_file(os.path.join(self.fx.dir, "chain.pem"), b"junk")
        self.assertLoadError(
            TLSSettings(files.cert_file, files.key_file, chain), f"TLS chain file {chain}"
        )

    def test_ec_key(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        server = make_server_cert(self.fx.ca)
        # Re-sign a certificate for an EC key: ECDHE-ECDSA suites are in the policy too.
        cert = (
            x509.CertificateBuilder()
            .subject_name(server.cert.subject).issuer_name(server.cert.issuer)
            .public_key(key.public_key()).serial_number(7)
            .not_valid_before(server.cert.not_valid_before_utc)
            .not_valid_after(server.cert.not_valid_after_utc)
            .sign(self.fx.ca.key, server.cert.signature_hash_algorithm)  # type: ignore[arg-type]
        )
        load_certificate_options(self.fx.settings(CertAndKey(cert, key)))


class ReloadTests(SynchronousTestCase):
    """ReloadingContextFactory and CertificateWatcher driven by a Clock."""

    def setUp(self) -> None:
        self.fx = _Fixture(self)
        self.clock = _now_clock()
        self.events = EventLoggingObserver.createWithCleanup(
            cast(TestCase, self), globalLogPublisher
        )
        self.settings = self.fx.settings(make_server_cert(self.fx.ca, serial=1001))
        self.factory = ReloadingContextFactory(self.settings, self.clock)

    def replace(self, server: CertAndKey, **kwargs: Any) -> None:
        files = self.fx.files(server, **kwargs)
        self.assertEqual((files.cert_file, files.key_file), self.settings.paths)

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, self.factory))
        self.assertEqual(self.factory.serial, 1001)

    def test_startup_error_raises(self) -> None:
        settings = self.fx.settings(make_server_cert(self.fx.ca), key=rsa_key(1))
        self.assertRaises(TLSConfigError, ReloadingContextFactory, settings, self.clock)

    def test_reload_swaps(self) -> None:
        old_options = self.factory.options
        self.replace(make_server_cert(self.fx.ca, serial=2002, key_index=2))
        self.assertTrue(self.factory.reload())
        self.assertEqual(self.factory.serial, 2002)
        self.assertIsNot(self.factory.options, old_options)
        infos = _messages(self.events, LogLevel.info)
        self.assertTrue(any("(requested)" in m and "serial 7D2" in m for m in infos), infos)

    def test_connections_use_current_context(self) -> None:
        before = self.factory.serverConnectionForTLS(cast(TLSMemoryBIOProtocol, None))
        self.replace(make_server_cert(self.fx.ca, serial=2002, key_index=2))
        self.factory.reload()
        after = self.factory.serverConnectionForTLS(cast(TLSMemoryBIOProtocol, None))
        self.assertIsNot(before.get_context(), after.get_context())
        self.assertIs(after.get_context(), self.factory.options.getContext())

    def test_broken_reload_keeps_old(self) -> None:
        self.replace(make_server_cert(self.fx.ca, serial=2002), key=rsa_key(1))
        self.assertFalse(self.factory.reload())
        self.assertEqual(self.factory.serial, 1001)
        errors = _messages(self.events, LogLevel.error)
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("still serving serial 3E9", errors[0])
        self.assertIn("does not match", errors[0])
        self.assertIn(self.settings.key_file, errors[0])

    def test_reload_to_expired_refused(self) -> None:
        self.replace(make_expired_cert(self.fx.ca, serial=2002))
        self.assertFalse(self.factory.reload())
        self.assertEqual(self.factory.serial, 1001)
        self.assertIn("expired", _messages(self.events, LogLevel.error)[0])

    def test_reload_unreadable_files_keeps_old(self) -> None:
        os.remove(self.settings.key_file)
        self.assertFalse(self.factory.reload("SIGHUP"))
        self.assertEqual(self.factory.serial, 1001)
        self.assertIn("(SIGHUP)", _messages(self.events, LogLevel.error)[0])

    def test_reload_if_changed(self) -> None:
        self.assertFalse(self.factory.reload_if_changed())
        self.replace(make_server_cert(self.fx.ca, serial=2002, key_index=2))
        self.assertTrue(self.factory.reload_if_changed())
        self.assertEqual(self.factory.serial, 2002)
        self.assertFalse(self.factory.reload_if_changed())

    def test_broken_change_reported_once_then_fixed(self) -> None:
        new = make_server_cert(self.fx.ca, serial=2002, key_index=2)
        # A renewal caught halfway: the new certificate is there, its key not yet.
        write_file(self.settings.cert_file, new.cert_pem)
        self.assertFalse(self.factory.reload_if_changed())
        self.assertFalse(self.factory.reload_if_changed())
        self.assertEqual(len(_messages(self.events, LogLevel.error)), 1)
        self.assertEqual(self.factory.serial, 1001)
        write_file(self.settings.key_file, new.key_pem)
        self.assertTrue(self.factory.reload_if_changed())
        self.assertEqual(self.factory.serial, 2002)

    def test_missing_file_during_poll(self) -> None:
        os.remove(self.settings.cert_file)
        self.assertFalse(self.factory.reload_if_changed())
        self.assertFalse(self.factory.reload_if_changed())
        self.assertEqual(len(_messages(self.events, LogLevel.error)), 1)
        self.replace(make_server_cert(self.fx.ca, serial=2002, key_index=2))
        self.assertTrue(self.factory.reload_if_changed())

    def test_refresh_reads_off_thread(self) -> None:
        """The files are read and checked by the factory's OffThread (the reactor's pool)."""
        ran: list[object] = []
        inline = self.factory.off_thread

        def recording(f: object, *args: object) -> object:
            ran.append(f)
            return inline(f, *args)  # type: ignore[arg-type]

        self.factory.off_thread = recording  # type: ignore[assignment]
        self.replace(make_server_cert(self.fx.ca, serial=2002, key_index=2))
        self.assertTrue(self.successResultOf(self.factory.refresh("SIGHUP")))
        self.assertEqual(self.factory.serial, 2002)
        self.assertEqual(len(ran), 1)
        self.assertFalse(self.successResultOf(
            self.factory.refresh("files changed", only_if_changed=True)))

    def test_refresh_refuses_a_fifo(self) -> None:
        os.remove(self.settings.cert_file)
        os.mkfifo(self.settings.cert_file)
        self.assertFalse(self.successResultOf(self.factory.refresh("SIGHUP")))
        self.assertEqual(self.factory.serial, 1001)
        self.assertIn("not a regular file", _messages(self.events, LogLevel.error)[0])

    def test_watcher_polls(self) -> None:
        watcher = CertificateWatcher(self.factory, self.clock, interval=30)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        self.clock.advance(30)
        self.assertEqual(self.factory.serial, 1001)
        self.replace(make_server_cert(self.fx.ca, serial=2002, key_index=2))
        self.clock.advance(29)
        self.assertEqual(self.factory.serial, 1001)
        self.clock.advance(1)
        self.assertEqual(self.factory.serial, 2002)

    def test_watcher_survives_exceptions(self) -> None:
        calls: list[int] = []

        def explode(*args: object, **kwargs: object) -> bool:
            calls.append(1)
            raise RuntimeError("boom")

        self.factory.refresh = explode  # type: ignore[method-assign,assignment]
        self.factory.check_expiry = explode  # type: ignore[method-assign,assignment]
        watcher = CertificateWatcher(
            self.factory, self.clock, interval=10, expiry_check_interval=15
        )
        watcher.startService()
        self.clock.advance(10)
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(len(calls), 5)  # polls at 10, 20, 30; expiry checks at 15, 30
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 5)
        watcher.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_watcher_stop_cancels_timers(self) -> None:
        watcher = CertificateWatcher(self.factory, self.clock)
        watcher.startService()
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        watcher.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        watcher.stopService()


class ExpiryTests(SynchronousTestCase):
    """seconds_until_expiry and the under-14-days warning."""

    def setUp(self) -> None:
        self.fx = _Fixture(self)
        self.events = EventLoggingObserver.createWithCleanup(
            cast(TestCase, self), globalLogPublisher
        )

    def test_seconds_until_expiry_exact(self) -> None:
        server = make_server_cert(self.fx.ca)
        not_after = server.cert.not_valid_after_utc.timestamp()
        clock = Clock()
        clock.advance(not_after - 40 * 86400)
        factory = ReloadingContextFactory(self.fx.settings(server), clock)
        self.assertEqual(factory.seconds_until_expiry(), 40 * 86400)
        self.assertEqual(factory.not_after, server.cert.not_valid_after_utc)
        clock.advance(15)
        self.assertEqual(factory.seconds_until_expiry(), 40 * 86400 - 15)
        self.assertEqual(_messages(self.events, LogLevel.warn), [])

    def test_warning_at_load(self) -> None:
        server = make_expiring_cert(self.fx.ca, days=3)
        not_after = server.cert.not_valid_after_utc.timestamp()
        clock = Clock()
        clock.advance(not_after - 3 * 86400)
        factory = ReloadingContextFactory(self.fx.settings(server), clock)
        self.assertEqual(factory.seconds_until_expiry(), 3 * 86400)
        warnings = _messages(self.events, LogLevel.warn)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("expires in 3.0 days", warnings[0])
        event = next(e for e in self.events if e.get("log_level") == LogLevel.warn)
        self.assertEqual(event["seconds_left"], 3 * 86400)

    def test_real_time_default(self) -> None:
        factory = ReloadingContextFactory(
            self.fx.settings(make_expiring_cert(self.fx.ca, days=3)), _now_clock()
        )
        self.assertTrue(2 * 86400 < factory.seconds_until_expiry() <= 3 * 86400)
        self.assertEqual(len(_messages(self.events, LogLevel.warn)), 1)

    def test_warning_at_reload(self) -> None:
        clock = _now_clock()
        settings = self.fx.settings(make_server_cert(self.fx.ca))
        factory = ReloadingContextFactory(settings, clock)
        self.assertEqual(_messages(self.events, LogLevel.warn), [])
        self.fx.files(make_expiring_cert(self.fx.ca, days=5))
        self.assertTrue(factory.reload())
        self.assertIn("expires in", _messages(self.events, LogLevel.warn)[0])

    def test_daily_check(self) -> None:
        server = make_server_cert(self.fx.ca)
        not_after = server.cert.not_valid_after_utc.timestamp()
        clock = Clock()
        clock.advance(not_after - 15 * 86400)
        factory = ReloadingContextFactory(self.fx.settings(server), clock)
        watcher = CertificateWatcher(factory, clock, interval=3600)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        clock.pump([3600] * 24)  # one day: 14 days left, not under
        self.assertEqual(_messages(self.events, LogLevel.warn), [])
        clock.pump([3600] * 24)  # 13 days left
        warnings = _messages(self.events, LogLevel.warn)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("expires in 13.0 days", warnings[0])
        clock.pump([3600] * 24 * 14)  # expired while running
        self.assertIn("EXPIRED", _messages(self.events, LogLevel.error)[-1])
        self.assertLess(factory.seconds_until_expiry(), 0)
        self.assertEqual(EXPIRY_WARNING_SECONDS, 14 * 86400)


# --- real sockets ----------------------------------------------------------------------------


class _Json(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"ok": True}).encode()


class _Root(Resource):
    """The tree's root; lets every request through when the site is a GatewaySite."""

    @staticmethod
    def early_check(request: Request) -> None:
        """Nothing to refuse."""


class _Events(Resource):
    """SSE: sends event 0 at once, then the rest slowly; ``hold`` waits for ``release()``."""

    isLeaf = True

    def __init__(self, count: int = 4, interval: float = 0.01) -> None:
        super().__init__()
        self.count = count
        self.interval = interval
        self.hold = False
        self.held: list[Request] = []
        self._pending: dict[Request, Any] = {}

    def render_GET(self, request: Request) -> int:
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"data: 0\n\n")
        request.notifyFinish().addErrback(lambda _: self._cancel(request))
        if self.hold:
            self.held.append(request)
        else:
            self._schedule(request, 1)
        return NOT_DONE_YET

    def release(self) -> None:
        for request in self.held:
            self._schedule(request, 1)
        self.held = []

    def _schedule(self, request: Request, n: int) -> None:
        self._pending[request] = reactor.callLater(self.interval, self._emit, request, n)

    def _emit(self, request: Request, n: int) -> None:
        del self._pending[request]
        # The gateway's request relays pieces with write_piece: over TLS it must encrypt them.
        write = getattr(request, "write_piece", request.write)
        write(f"data: {n}\n\n".encode())
        if n + 1 < self.count:
            self._schedule(request, n + 1)
        else:
            request.finish()

    def _cancel(self, request: Request) -> None:
        call = self._pending.pop(request, None)
        if call is not None and call.active():
            call.cancel()


class _H2AdvertisingSite(Site):
    """A Site as it would be with the h2 package installed: h2 first."""

    def acceptableProtocols(self) -> list[bytes]:
        return [b"h2", b"http/1.1"]


@implementer(IOpenSSLClientConnectionCreator)
class _ClientCreator:
    """Client connections from a hand-made pyOpenSSL context (versions, ciphers, ALPN)."""

    def __init__(self, context: SSL.Context, alpn: Sequence[bytes] = ()) -> None:
        self.context = context
        self.alpn = list(alpn)

    def clientConnectionForTLS(self, tls_protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_tlsext_host_name(b"localhost")
        if self.alpn:
            connection.set_alpn_protos(self.alpn)
        return connection


def _client_context(
    ca_file: str,
    min_version: int | None = None,
    max_version: int | None = None,
    ciphers: bytes | None = None,
) -> SSL.Context:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.load_verify_locations(ca_file)
    context.set_verify(SSL.VERIFY_PEER)
    if min_version is not None:
        context.set_min_proto_version(min_version)
    if max_version is not None:
        context.set_max_proto_version(max_version)
    if ciphers is not None:
        context.set_cipher_list(ciphers)
    return context


@implementer(IHandshakeListener)
class _Probe(Protocol):
    """A TLS client: records what the handshake gave, optionally sends a raw HTTP request."""

    def __init__(self, request: bytes | None = None) -> None:
        self.request = request
        self.handshake: Deferred[None] = Deferred()
        self.closed: Deferred[bytes] = Deferred()
        self.data = b""
        self.serial: int | None = None
        self.version: str | None = None
        self.cipher: str | None = None
        self.alpn: bytes | None = None
        self._waiting: list[tuple[bytes, Deferred[None]]] = []

    def handshakeCompleted(self) -> None:
        connection = cast(SSL.Connection, self.transport.getHandle())  # type: ignore[union-attr]
        cert = connection.get_peer_certificate(as_cryptography=True)
        assert cert is not None
        self.serial = cert.serial_number
        self.version = connection.get_protocol_version_name()
        self.cipher = connection.get_cipher_name()
        self.alpn = connection.get_alpn_proto_negotiated()
        self.handshake.callback(None)
        if self.request is not None:
            self.transport.write(self.request)  # type: ignore[union-attr]

    def wait_for(self, marker: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append((marker, d))
        self._check()
        return d

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._check()

    def _check(self) -> None:
        ready = [(m, d) for m, d in self._waiting if m in self.data]
        self._waiting = [(m, d) for m, d in self._waiting if m not in self.data]
        for _, d in ready:
            d.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.handshake.called:
            self.handshake.errback(reason)
        self.closed.callback(self.data)


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()


class _BodyCollector(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: Deferred[list[bytes]] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(self.chunks)


class _ServerTestCase(TestCase):
    """A real TLS listener on 127.0.0.1 serving a tiny Site, and real OpenSSL clients."""

    site_class: type[Site] = Site

    def setUp(self) -> None:
        self.fx = _Fixture(self)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.ports: list[IListeningPort] = []
        self.addCleanup(self._stop_ports)

    async def start(self, settings: TLSSettings) -> ReloadingContextFactory:
        factory = ReloadingContextFactory(settings, reactor)
        root = _Root()
        root.putChild(b"json", _Json())
        self.sse = _Events()
        root.putChild(b"events", self.sse)
        site = self.site_class(root, reactor=reactor)
        endpoint = tls_server_endpoint(reactor, 0, "127.0.0.1", factory)
        port = await endpoint.listen(site)
        self.ports.append(port)
        self.port_number: int = port.getHost().port  # type: ignore[attr-defined]
        return factory

    async def start_default(self, serial: int = 1001, min_version: str = "1.2") -> (
        ReloadingContextFactory
    ):
        files = self.fx.files(make_server_cert(self.fx.ca, serial=serial))
        return await self.start(TLSSettings(files.cert_file, files.key_file,
                                            min_version=min_version))

    async def _stop_ports(self) -> None:
        for port in self.ports:
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        # Let the server side of every connection finish closing: trial checks for leftovers.
        for port in self.ports:
            for _ in range(500):
                if not port.factory.protocols:  # type: ignore[attr-defined]
                    break
                await deferLater(reactor, 0.01, lambda: None)

    async def probe(
        self, context: SSL.Context | None = None, request: bytes | None = None,
        alpn: Sequence[bytes] = (),
    ) -> _Probe:
        """Connect and complete the handshake (raises on a refused one)."""
        if context is None:
            context = _client_context(self.fx.ca_file)
        probe = _Probe(request)
        endpoint = wrapClientTLS(
            _ClientCreator(context, alpn),
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.port_number),
            clock=reactor,
        )
        await connectProtocol(endpoint, probe)
        try:
            await probe.handshake
        except BaseException:
            await probe.closed
            raise
        return probe

    async def handshake_only(self, context: SSL.Context, alpn: Sequence[bytes] = ()) -> _Probe:
        probe = await self.probe(context, alpn=alpn)
        probe.transport.loseConnection()  # type: ignore[union-attr]
        await probe.closed
        return probe

    async def refused(self, context: SSL.Context) -> str:
        """The error text of a handshake the server must refuse."""
        try:
            await self.handshake_only(context)
        except SSL.Error as e:
            return str(e)
        self.fail("handshake succeeded")


class ServerTests(_ServerTestCase):
    """The policy, a real HTTPS client, and reload on a live listener."""

    # (1) a real HTTPS client

    async def test_ipv6_interface(self) -> None:
        factory = await self.start_default()
        endpoint = tls_server_endpoint(reactor, 0, "::1", factory)
        try:
            port = await endpoint.listen(Site(_Json(), reactor=reactor))
        except CannotListenError:
            raise SkipTest("no IPv6 loopback here") from None
        self.ports.append(port)
        self.assertIsInstance(port.getHost(), IPv6Address)

    async def test_https_client_json_and_sse(self) -> None:
        await self.start_default()
        with open(self.fx.ca_file, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=trust), pool=pool)
        base = f"https://localhost:{self.port_number}"

        response: IResponse = await agent.request(b"GET", f"{base}/json".encode())
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(await readBody(response)), {"ok": True})

        response = await agent.request(b"GET", f"{base}/events".encode())
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"]
        )
        collector = _BodyCollector()
        response.deliverBody(collector)
        body = b"".join(await collector.done)
        self.assertEqual(body, b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\n")

    # (2) protocol versions and ciphers

    async def test_tls11_refused(self) -> None:
        await self.start_default()
        why = await self.refused(_client_context(
            self.fx.ca_file, SSL.TLS1_1_VERSION, SSL.TLS1_1_VERSION, b"DEFAULT:@SECLEVEL=0"
        ))
        self.assertIn("alert protocol version", why)  # the server's alert, not a local error

    async def test_static_rsa_refused(self) -> None:
        await self.start_default()
        why = await self.refused(_client_context(
            self.fx.ca_file, max_version=SSL.TLS1_2_VERSION, ciphers=b"AES128-GCM-SHA256"
        ))
        self.assertIn("alert handshake failure", why)

    async def test_ecdhe_tls12_works(self) -> None:
        await self.start_default()
        probe = await self.handshake_only(_client_context(
            self.fx.ca_file, max_version=SSL.TLS1_2_VERSION,
            ciphers=b"ECDHE-RSA-AES128-GCM-SHA256",
        ))
        self.assertEqual((probe.version, probe.cipher), ("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256"))

    async def test_tls13_works(self) -> None:
        await self.start_default()
        probe = await self.handshake_only(
            _client_context(self.fx.ca_file, min_version=SSL.TLS1_3_VERSION)
        )
        self.assertEqual(probe.version, "TLSv1.3")
        self.assertEqual(probe.serial, 1001)

    async def test_min_version_13(self) -> None:
        await self.start_default(min_version="1.3")
        why = await self.refused(
            _client_context(self.fx.ca_file, max_version=SSL.TLS1_2_VERSION)
        )
        self.assertIn("alert protocol version", why)  # the server's alert, not a local error
        probe = await self.handshake_only(_client_context(self.fx.ca_file))
        self.assertEqual(probe.version, "TLSv1.3")

    async def test_chain_served(self) -> None:
        intermediate = make_ca("llamaproxy test intermediate", issuer=self.fx.ca)
        files = self.fx.files(make_server_cert(intermediate, serial=77), chain=[intermediate.cert])
        await self.start(TLSSettings(files.cert_file, files.key_file, files.chain_file))
        # The client trusts only the root: the handshake works only if the intermediate is sent.
        probe = await self.handshake_only(_client_context(self.fx.ca_file))
        self.assertEqual(probe.serial, 77)

    # (3) ALPN

    async def test_alpn_http11(self) -> None:
        await self.start_default()
        probe = await self.handshake_only(
            _client_context(self.fx.ca_file), alpn=[b"h2", b"http/1.1"]
        )
        self.assertEqual(probe.alpn, b"http/1.1")

    async def test_alpn_h2_only_client_gets_no_protocol(self) -> None:
        await self.start_default()
        probe = await self.handshake_only(_client_context(self.fx.ca_file), alpn=[b"h2"])
        self.assertEqual(probe.alpn, b"")

    # (4) reload under a live stream, (5) a broken renewal

    async def _reload_under_stream(self, trigger: str) -> None:
        watcher_clock = Clock()
        factory = await self.start_default(serial=1001)
        watcher = CertificateWatcher(factory, watcher_clock, interval=60)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        self.sse.hold = True

        stream = await self.probe(request=_get("/events"))
        await stream.wait_for(b"data: 0\n\n")
        self.assertEqual(stream.serial, 1001)

        self.fx.files(make_server_cert(self.fx.ca, serial=2002, key_index=2))
        if trigger == "reload":
            self.assertTrue(factory.reload())
        else:
            watcher_clock.advance(60)
        self.assertEqual(factory.serial, 2002)

        fresh = await self.probe(request=_get("/json"))
        self.assertEqual(fresh.serial, 2002)
        self.assertIn(b'{"ok": true}', await fresh.closed)

        # The old connection keeps its certificate and its stream runs to the end.
        self.sse.release()
        body = await stream.closed
        for n in range(4):
            self.assertIn(f"data: {n}\n\n".encode(), body)
        self.assertTrue(body.endswith(b"0\r\n\r\n"), body[-40:])
        self.assertEqual(stream.serial, 1001)

    async def test_reload_under_stream(self) -> None:
        await self._reload_under_stream("reload")

    async def test_watcher_reload_under_stream(self) -> None:
        await self._reload_under_stream("watcher")

    async def test_broken_renewal_keeps_serving_old(self) -> None:
        factory = await self.start_default(serial=1001)
        self.fx.files(make_server_cert(self.fx.ca, serial=2002), key=rsa_key(1))
        self.assertFalse(factory.reload())
        errors = _messages(self.events, LogLevel.error)
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("does not match", errors[0])
        probe = await self.probe(request=_get("/json"))
        self.assertEqual(probe.serial, 1001)
        self.assertIn(b'{"ok": true}', await probe.closed)


class GatewaySiteOverTLSTests(_ServerTestCase):
    """The gateway's own site behind TLS: relayed pieces are encrypted like everything else."""

    site_class = GatewaySite

    async def test_stream_pieces_are_encrypted(self) -> None:
        await self.start_default()
        stream = await self.probe(request=_get("/events"))
        body = await stream.closed
        for n in range(4):
            self.assertIn(f"data: {n}\n\n".encode(), body)
        self.assertTrue(body.endswith(b"0\r\n\r\n"), body[-40:])


class H2SiteTests(_ServerTestCase):
    """The same, with a Site that advertises h2 first: ALPN must still say http/1.1."""

    site_class = _H2AdvertisingSite

    async def test_alpn_http11(self) -> None:
        await self.start_default()
        probe = await self.handshake_only(
            _client_context(self.fx.ca_file), alpn=[b"h2", b"http/1.1"]
        )
        self.assertEqual(probe.alpn, b"http/1.1")
        site = self.ports[0].factory.wrappedFactory  # type: ignore[attr-defined]
        self.assertEqual(site.acceptableProtocols()[0], b"h2")

    async def test_alpn_h2_only_client_gets_no_protocol(self) -> None:
        await self.start_default()
        probe = await self.handshake_only(_client_context(self.fx.ca_file), alpn=[b"h2"])
        self.assertEqual(probe.alpn, b"")
