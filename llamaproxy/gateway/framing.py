"""Which body framing a request may have: exactly one Content-Length, or one ``chunked``.

Anything else could be read differently by a proxy in front or behind (request smuggling), so
the channel refuses it once the head is in and closes the connection: both headers together
whatever the coding (400), a repeated or malformed Content-Length, a repeated
Transfer-Encoding header, a list of codings (400), or a single coding other than chunked (501,
RFC 9112 6.1).
"""

from __future__ import annotations

from llamaproxy.gateway import errors
from llamaproxy.gateway.errors import GatewayError

#: Bits of the framing headers a request had.
CONTENT_LENGTH = 1
TRANSFER_ENCODING = 2

BOTH_FRAMINGS = errors.bad_request(
    "Content-Length and Transfer-Encoding together: a request may have only one of them"
)
_REPEATED_LENGTH = errors.bad_request("Repeated Content-Length header: a request has one")


def _shown(value: bytes) -> str:
    """A header value for an error message: quoted, at most 100 characters."""
    return repr(value[:100].decode("latin-1"))


def framing_header(
    seen: int, name: bytes, value: bytes
) -> tuple[int, GatewayError | None, bool]:
    """One framing header (``name`` lower-case) after the ``seen`` ones: the framing bits
    now, the rule it breaks (None if none), and whether that error is the one to answer
    even if an earlier header broke another rule (both framings together)."""
    if name == b"content-length":
        if seen & TRANSFER_ENCODING:
            return seen | CONTENT_LENGTH, BOTH_FRAMINGS, True
        if not value.isdigit():
            return seen | CONTENT_LENGTH, errors.bad_request(
                f"Malformed Content-Length header {_shown(value)}: it must be digits only"), False
        return seen | CONTENT_LENGTH, _REPEATED_LENGTH if seen & CONTENT_LENGTH else None, False
    framing = seen | TRANSFER_ENCODING
    coding = value.lower()
    if seen & CONTENT_LENGTH:
        return framing, BOTH_FRAMINGS, True
    if seen & TRANSFER_ENCODING:
        return framing, errors.bad_request(
            "Repeated Transfer-Encoding header: only a single 'chunked' is accepted"), False
    if not coding.strip(b" \t,"):
        return framing, errors.bad_request("Empty Transfer-Encoding header"), False
    if b"," in coding:
        return framing, errors.bad_request(
            f"Transfer-Encoding {_shown(value)} lists several codings: only a single "
            "'chunked' is accepted"), False
    if coding != b"chunked":
        return framing, errors.unsupported_transfer_encoding(value.decode("latin-1")), False
    return framing, None, False


def llhttp_refusal(reason: str, seen: int) -> GatewayError:
    """The error for a head llhttp refused, in the gateway's words where it has them.

    llhttp stops at some framing headers before the channel sees them (a second
    Content-Length, a malformed one, an empty Transfer-Encoding); its reason names the header,
    and the framing headers ``seen`` before say which rule it broke. (The reasons are llhttp's
    messages, pinned with httptools' range and by tests/gateway/test_channel.py.)
    """
    if "Content-Length" in reason:
        if seen & TRANSFER_ENCODING:
            return BOTH_FRAMINGS
        if seen & CONTENT_LENGTH or "Duplicate" in reason:
            return _REPEATED_LENGTH
        return errors.bad_request("Malformed Content-Length header: it must be digits only")
    if "Transfer-Encoding" in reason:
        if seen & CONTENT_LENGTH:
            return BOTH_FRAMINGS
        if "Empty" in reason:
            return errors.bad_request("Empty Transfer-Encoding header")
        return errors.bad_request(f"Malformed Transfer-Encoding header: {reason}")
    return errors.bad_request(f"Malformed request: {reason}")
