"""TLS for the gateway listeners: hardened CertificateOptions from PEM files, reload, expiry, HSTS.

The policy is fixed, not configurable beyond the minimum version: TLS >= 1.2, forward-secret AEAD
suites only (``ECDHE+AESGCM:ECDHE+CHACHA20``; OpenSSL's TLS 1.3 suites are all AEAD and
forward-secret), and ALPN ``http/1.1`` only, whatever the wrapped ``Site`` advertises.

Reload: a listener keeps one ``ReloadingContextFactory`` for its whole life. Twisted asks it for a
new ``SSL.Connection`` at every accept (``serverConnectionForTLS``); the factory builds it from the
current ``SSL.Context``. A reload validates the files and swaps in a new context, so new handshakes
use the new certificate while open connections keep the context they were created with. A reload
that fails validation keeps the current certificate and logs why.

Slightly over 500 lines: the validation messages (what is wrong with a certificate and how to fix
it) are most of it.
"""

from __future__ import annotations

import datetime
import itertools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from OpenSSL import SSL
from OpenSSL.crypto import X509, PKey
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, wrapServerTLS
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IReactorTCP,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from llamaproxy.bounded_file import UnsafeFileError, read_bounded
from llamaproxy.off_thread import OffThread

if TYPE_CHECKING:
    from OpenSSL.SSL import _NoOverlappingProtocols
    from twisted.protocols.tls import TLSMemoryBIOProtocol

log = Logger()

#: Forward-secret AEAD suites for TLS 1.2; no static-RSA key exchange, no CBC, no SHA-1 MACs.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
#: The only ALPN protocol offered: the gateway's streaming and backpressure are HTTP/1.1's.
ALPN_PROTOCOLS: tuple[bytes, ...] = (b"http/1.1",)
#: Accepted values of ``TLS_MIN_VERSION``.
MIN_VERSIONS: dict[str, TLSVersion] = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}
#: Warn when the certificate expires in less than this many seconds (14 days).
EXPIRY_WARNING_SECONDS = 14 * 24 * 3600.0
#: The response header ``hsts_header`` gives a value for.
HSTS_HEADER = "Strict-Transport-Security"

_ALLOWED_KEY_TYPES = (
    rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey
)


class TLSConfigError(ValueError):
    """TLS files or settings are unusable; the message names the file and says why."""


@dataclass(frozen=True)
class TLSSettings:
    """Where the PEM files are and the lowest TLS version to accept ("1.2" or "1.3")."""

    cert_file: str
    key_file: str
    chain_file: str | None = None
    min_version: str = "1.2"

    def __post_init__(self) -> None:
        for kind, path in (("certificate", self.cert_file), ("key", self.key_file)):
            if not path.strip():
                raise TLSConfigError(f"TLS {kind} file is not set")
        if self.min_version not in MIN_VERSIONS:
            raise TLSConfigError(
                f"TLS minimum version must be one of {', '.join(MIN_VERSIONS)}, "
                f"got {self.min_version!r}"
            )

    @property
    def paths(self) -> tuple[str, ...]:
        """The files a reload reads, in a fixed order."""
        return (self.cert_file, self.key_file, *((self.chain_file,) if self.chain_file else ()))


def hsts_header(max_age: int, include_subdomains: bool = False) -> str:
    """The ``Strict-Transport-Security`` value for ``max_age`` seconds (0: browsers forget)."""
    if max_age < 0:
        raise ValueError(f"HSTS max-age must be >= 0, got {max_age}")
    return f"max-age={max_age}" + ("; includeSubDomains" if include_subdomains else "")


def _select_alpn(
    connection: SSL.Connection, offered: list[bytes]
) -> bytes | _NoOverlappingProtocols:
    for protocol in ALPN_PROTOCOLS:
        if protocol in offered:
            return protocol
    # Go on without ALPN (as if the client had not offered it) rather than fail the handshake.
    return SSL.NO_OVERLAPPING_PROTOCOLS


class HardenedCertificateOptions(CertificateOptions):
    """CertificateOptions whose server connections negotiate ALPN ``http/1.1`` and nothing else.

    Plain CertificateOptions adds the wrapped factory's ``acceptableProtocols()`` to its own list,
    and ``Site`` puts ``h2`` first when the h2 package is importable. This class replaces the
    context's ALPN selection so that installing h2 can never move clients onto HTTP/2.
    """

    _alpn_forced = False

    def getContext(self) -> SSL.Context:
        context = super().getContext()
        if not self._alpn_forced:
            context.set_alpn_select_callback(_select_alpn)
            self._alpn_forced = True
        return context

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self.getContext(), None)


@dataclass(frozen=True)
class _Loaded:
    """A validated certificate/key/chain and the options built from them."""

    options: HardenedCertificateOptions
    serial: int
    subject: str
    not_after: datetime.datetime
    fingerprint: str


def _read(kind: str, path: str) -> bytes:
    try:
        return read_bounded(path)  # a regular file of at most 16 MiB: never a FIFO or a device
    except UnsafeFileError as e:
        raise TLSConfigError(f"TLS {kind} file {path}: cannot read it: {e}") from None
    except OSError as e:
        raise TLSConfigError(f"TLS {kind} file {path}: cannot read it: {e.strerror or e}") from None


def _load_certs(kind: str, path: str, data: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        hint = ""
        if b"PRIVATE KEY-----" in data:
            hint = " (it holds a private key: are the certificate and key files swapped?)"
        elif data and b"-----BEGIN" not in data:
            hint = " (DER? convert it with: openssl x509 -inform der -in FILE -out FILE.pem)"
        raise TLSConfigError(f"TLS {kind} file {path}: no PEM certificate found{hint}")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSConfigError(f"TLS {kind} file {path}: not a valid PEM certificate: {e}") from None


def _load_key(path: str, data: bytes) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | (
    ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
):
    if b"PRIVATE KEY-----" not in data:
        hint = ""
        if b"-----BEGIN CERTIFICATE-----" in data:
            hint = " (it holds a certificate: are the certificate and key files swapped?)"
        raise TLSConfigError(f"TLS key file {path}: no PEM private key found{hint}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSConfigError(
            f"TLS key file {path}: the private key is encrypted with a passphrase; store it "
            "unencrypted, readable only by the gateway's user"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TLSConfigError(f"TLS key file {path}: not a valid PEM private key: {e}") from None
    if not isinstance(key, _ALLOWED_KEY_TYPES):
        raise TLSConfigError(
            f"TLS key file {path}: unsupported key type {type(key).__name__} "
            "(use RSA, ECDSA or EdDSA)"
        )
    return key


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_chain(certs: Sequence[tuple[x509.Certificate, str, str]]) -> None:
    """Each certificate must be issued (name and signature) by the next one."""
    for (child, _, _), (parent, kind, path) in itertools.pairwise(certs):
        try:
            child.verify_directly_issued_by(parent)
        except Exception as e:
            why = str(e) or type(e).__name__
            raise TLSConfigError(
                f"TLS {kind} file {path}: broken chain: {child.subject.rfc4514_string()!r} "
                f"is not issued by the next certificate, {parent.subject.rfc4514_string()!r} "
                f"({why}); the chain must go leaf first, then each issuer in order"
            ) from None


def _load(settings: TLSSettings, now: float) -> _Loaded:
    """Read and validate the files; build the options. Raises TLSConfigError naming the file."""
    cert_data = _read("certificate", settings.cert_file)
    key_data = _read("key", settings.key_file)
    chain_data = _read("chain", settings.chain_file) if settings.chain_file else None

    cert_certs = _load_certs("certificate", settings.cert_file, cert_data)
    leaf = cert_certs[0]
    # A fullchain.pem carries the intermediates after the leaf; a chain file may repeat them.
    chain: list[tuple[x509.Certificate, str, str]] = [
        (c, "certificate", settings.cert_file) for c in cert_certs
    ]
    if settings.chain_file and chain_data is not None:
        chain += [(c, "chain", settings.chain_file)
                  for c in _load_certs("chain", settings.chain_file, chain_data)]
    unique: list[tuple[x509.Certificate, str, str]] = []
    for entry in chain:
        if all(entry[0] != seen[0] for seen in unique):
            unique.append(entry)
    _check_chain(unique)

    key = _load_key(settings.key_file, key_data)
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise TLSConfigError(
            f"TLS key file {settings.key_file}: the private key does not match the certificate "
            f"in {settings.cert_file} ({leaf.subject.rfc4514_string()}, "
            f"serial {leaf.serial_number:X})"
        )

    moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
    if leaf.not_valid_after_utc <= moment:
        raise TLSConfigError(
            f"TLS certificate file {settings.cert_file}: the certificate expired at "
            f"{leaf.not_valid_after_utc.isoformat()} (serial {leaf.serial_number:X}); renew it"
        )
    if leaf.not_valid_before_utc > moment:
        raise TLSConfigError(
            f"TLS certificate file {settings.cert_file}: the certificate is not valid before "
            f"{leaf.not_valid_before_utc.isoformat()} (is this machine's clock right?)"
        )
    for cert, kind, path in unique[1:]:
        if cert.not_valid_after_utc <= moment:
            log.warn(
                "TLS {kind} file {path}: chain certificate {subject} expired at {not_after}; "
                "clients that build their path through it will fail",
                kind=kind, path=path, subject=cert.subject.rfc4514_string(),
                not_after=cert.not_valid_after_utc.isoformat(),
            )

    options = HardenedCertificateOptions(
        privateKey=PKey.from_cryptography_key(key),
        certificate=X509.from_cryptography(leaf),
        extraCertChain=[X509.from_cryptography(c) for c, _, _ in unique[1:]],
        raiseMinimumTo=MIN_VERSIONS[settings.min_version],
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(CIPHERS),
        acceptableProtocols=list(ALPN_PROTOCOLS),
    )
    try:
        # Build the context now: OpenSSL's own checks (key size, security level) fail here.
        options.getContext()
    except SSL.Error as e:
        raise TLSConfigError(
            f"TLS certificate file {settings.cert_file} / key file {settings.key_file}: "
            f"OpenSSL refused them: {e}"
        ) from None
    return _Loaded(
        options=options,
        serial=leaf.serial_number,
        subject=leaf.subject.rfc4514_string(),
        not_after=leaf.not_valid_after_utc,
        fingerprint=leaf.fingerprint(hashes.SHA256()).hex(),
    )


def load_certificate_options(
    settings: TLSSettings, now: float | None = None
) -> HardenedCertificateOptions:
    """Validate the files and build hardened options (no reload); raises TLSConfigError.

    ``now`` (POSIX seconds, default the current time) is the moment the validity is checked at.
    """
    return _load(settings, now if now is not None else time.time()).options


_Snapshot = tuple[tuple[int, int, int, int, int] | None, ...]


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingContextFactory:
    """Creates server TLS connections from the current certificate; reloadable at any time.

    Construction loads and validates the files and raises TLSConfigError if they are unusable.
    ``clock`` supplies the current time for validity and expiry. ``refresh`` reloads with the
    files read and checked by ``off_thread`` (the reactor's thread pool in twistd); ``reload``
    and ``reload_if_changed`` are its synchronous forms.
    """

    def __init__(
        self, settings: TLSSettings, clock: IReactorTime, off_thread: OffThread | None = None
    ) -> None:
        self.settings = settings
        self._clock = clock
        self.off_thread = off_thread or OffThread.inline()
        snapshot = self._snapshot()
        self._current = _load(settings, clock.seconds())
        self._snapshot_seen = snapshot
        self._announce(self._current, "startup")

    # IOpenSSLServerConnectionCreator

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """A connection from the current context: only handshakes after a reload see the new one."""
        return self._current.options.serverConnectionForTLS(protocol)

    # Current certificate

    @property
    def serial(self) -> int:
        """The serial number of the certificate new connections get."""
        return self._current.serial

    @property
    def not_after(self) -> datetime.datetime:
        """When the current leaf certificate expires (UTC)."""
        return self._current.not_after

    @property
    def options(self) -> HardenedCertificateOptions:
        """The options of the current certificate."""
        return self._current.options

    def seconds_until_expiry(self) -> float:
        """Seconds until the current leaf's notAfter; negative once it has expired."""
        return self._current.not_after.timestamp() - self._clock.seconds()

    def check_expiry(self) -> float:
        """Log a warning if the certificate expires within 14 days (an error if it has expired)."""
        remaining = self.seconds_until_expiry()
        fields = {
            "subject": self._current.subject,
            "serial_hex": f"{self._current.serial:X}",
            "not_after": self._current.not_after.isoformat(),
            "path": self.settings.cert_file,
        }
        if remaining <= 0:
            log.error(
                "TLS certificate {subject} (serial {serial_hex}) from {path} has EXPIRED at "
                "{not_after}: clients refuse it; renew it and reload",
                **fields,
            )
        elif remaining < EXPIRY_WARNING_SECONDS:
            log.warn(
                "TLS certificate {subject} (serial {serial_hex}) from {path} expires in "
                "{days:.1f} days, at {not_after}; renew it",
                days=remaining / 86400, seconds_left=remaining, **fields,
            )
        return remaining

    # Reload

    def reload(self, reason: str = "requested") -> bool:
        """Load the files again and use them for new connections; False (old kept) on error."""
        return self._reload(reason, self._snapshot())

    def reload_if_changed(self) -> bool:
        """Reload if any file changed on disk since the last attempt; True if it swapped."""
        snapshot = self._snapshot()
        if snapshot == self._snapshot_seen:
            return False
        return self._reload("files changed", snapshot)

    def refresh(self, reason: str, only_if_changed: bool = False) -> Deferred[bool]:
        """``reload`` (or ``reload_if_changed``) with the files read and parsed off the reactor
        thread; fires with True when the new certificate is in use (never fails)."""
        snapshot = self._snapshot()
        if only_if_changed and snapshot == self._snapshot_seen:
            return succeed(False)
        self._snapshot_seen = snapshot
        loading = self.off_thread(_load, self.settings, self._clock.seconds())
        return loading.addBoth(self._swap, reason)

    def _reload(self, reason: str, snapshot: _Snapshot) -> bool:
        # A failed attempt is remembered too: a broken file is reported once, not at every poll.
        self._snapshot_seen = snapshot
        try:
            loaded = _load(self.settings, self._clock.seconds())
        except Exception:
            return self._swap(Failure(), reason)
        return self._swap(loaded, reason)

    def _swap(self, loaded: _Loaded | Failure, reason: str) -> bool:
        """Use ``loaded`` for new connections, or say why the reload failed (old one kept)."""
        if isinstance(loaded, Failure):
            if loaded.check(TLSConfigError):
                log.error(
                    "TLS reload ({reason}) failed, still serving serial {serial_hex}: {why}",
                    reason=reason, serial_hex=f"{self._current.serial:X}",
                    why=loaded.getErrorMessage(),
                )
            else:
                log.failure(
                    "TLS reload ({reason}) failed unexpectedly, still serving serial "
                    "{serial_hex}", loaded, reason=reason,
                    serial_hex=f"{self._current.serial:X}",
                )
            return False
        self._current = loaded
        self._announce(loaded, reason)
        return True

    def _announce(self, loaded: _Loaded, reason: str) -> None:
        log.info(
            "TLS certificate loaded ({reason}): {subject}, serial {serial_hex}, "
            "SHA-256 {fingerprint}, valid until {not_after}, TLS >= {min_version}",
            reason=reason, subject=loaded.subject, serial_hex=f"{loaded.serial:X}",
            fingerprint=loaded.fingerprint, not_after=loaded.not_after.isoformat(),
            min_version=self.settings.min_version, path=self.settings.cert_file,
        )
        self.check_expiry()

    def _snapshot(self) -> _Snapshot:
        states: list[tuple[int, int, int, int, int] | None] = []
        for path in self.settings.paths:
            try:
                st = os.stat(path)
            except OSError:
                states.append(None)
            else:
                states.append((st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_dev))
        return tuple(states)


class CertificateWatcher(Service):
    """Polls the TLS files and reloads on change; checks expiry once a day. Never dies."""

    def __init__(
        self,
        factory: ReloadingContextFactory,
        clock: IReactorTime,
        interval: float = 60.0,
        expiry_check_interval: float = 24 * 3600.0,
    ) -> None:
        self.factory = factory
        self.interval = interval
        self.expiry_check_interval = expiry_check_interval
        self._poll_loop = LoopingCall(self._poll)
        self._poll_loop.clock = clock
        self._expiry_loop = LoopingCall(self._check_expiry)
        self._expiry_loop.clock = clock

    def startService(self) -> None:
        super().startService()
        # Loading already checked expiry; both loops start one interval from now.
        self._poll_loop.start(self.interval, now=False)
        self._expiry_loop.start(self.expiry_check_interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        for loop in (self._poll_loop, self._expiry_loop):
            if loop.running:
                loop.stop()

    def _poll(self) -> Deferred[bool] | None:
        # A LoopingCall stops at the first exception: never let one escape. It waits for the
        # Deferred (refresh never fails), so reloads never overlap.
        try:
            return self.factory.refresh("files changed", only_if_changed=True)
        except Exception:
            log.failure("Error while checking the TLS files {paths}",
                        paths=self.factory.settings.paths)
            return None

    def _check_expiry(self) -> None:
        try:
            self.factory.check_expiry()
        except Exception:
            log.failure("Error while checking TLS certificate expiry")


def tls_server_endpoint(
    reactor: IReactorTCP,
    port: int,
    interface: str,
    creator: IOpenSSLServerConnectionCreator,
    backlog: int = 50,
    clock: IReactorTime | None = None,
) -> IStreamServerEndpoint:
    """A TCP listener (IPv6 if ``interface`` contains ':') whose connections speak TLS.

    ``creator`` is normally a ``ReloadingContextFactory``. ``clock`` (default: ``reactor``)
    schedules the TLS layer's write coalescing.
    """
    tcp: IStreamServerEndpoint
    if ":" in interface:
        tcp = TCP6ServerEndpoint(reactor, port, backlog, interface)
    else:
        tcp = TCP4ServerEndpoint(reactor, port, backlog, interface)
    return wrapServerTLS(creator, tcp, clock=clock if clock is not None else IReactorTime(reactor))
