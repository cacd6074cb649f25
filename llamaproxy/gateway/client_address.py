"""Who a client is: its address, believed from X-Forwarded-For/Forwarded only via trusted proxies.

The TCP peer is the client unless it is one of TRUSTED_PROXIES (CIDRs). A trusted peer's
``X-Forwarded-For`` (or, without one, the ``for=`` of its ``Forwarded``) is believed: the client
is the right-most address in the chain that is not itself a trusted proxy. The backend receives
an ``X-Forwarded-For`` the gateway built (the believed chain, then the peer) and
``X-Forwarded-Proto``; a client's own forwarding headers from an untrusted peer are dropped,
never passed on.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Request headers about the client's address or scheme that the gateway rebuilds itself.
FORWARDING_HEADERS = frozenset({
    b"x-forwarded-for", b"forwarded", b"x-forwarded-proto", b"x-forwarded-host",
    b"x-forwarded-port", b"x-real-ip", b"x-client-ip",
})

#: Longest forwarding chain believed (a longer one is cut to its right-most entries).
MAX_CHAIN = 16

_FORWARDED_FOR = re.compile(r'(?:^|[;,\s])for="?([^";,]+)"?', re.IGNORECASE)


def parse_trusted_proxies(entries: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs (or single addresses) as networks; ValueError naming the entry that is not one."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or CIDR network") from None
    return tuple(networks)


def _address(text: str) -> IPAddress | None:
    """An address from a forwarding header entry ("[v6]:port", "v4:port", bare), or None."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class ClientIdentity:
    """The client's address, and the X-Forwarded-For chain to send to the backend."""

    address: str
    chain: tuple[str, ...]
    #: The scheme the client used (a trusted proxy's X-Forwarded-Proto, else ours).
    proto: str

    def forwarding_headers(self) -> list[tuple[bytes, bytes]]:
        """The forwarding headers the backend gets."""
        return [
            (b"X-Forwarded-For", ", ".join(self.chain).encode("ascii")),
            (b"X-Forwarded-Proto", self.proto.encode("ascii")),
        ]


class TrustedProxies:
    """The proxies whose forwarding headers are believed."""

    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        self.networks = tuple(networks)

    def trusts(self, address: IPAddress | None) -> bool:
        """True when ``address`` is in one of the trusted networks."""
        if address is None or not self.networks:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def identify(
        self,
        peer: str,
        secure: bool,
        forwarded_for: Sequence[bytes],
        forwarded: Sequence[bytes],
        forwarded_proto: Sequence[bytes],
    ) -> ClientIdentity:
        """The client behind ``peer`` (the TCP peer's host; "" for a UNIX socket)."""
        proto = "https" if secure else "http"
        if not self.networks:  # nobody is trusted: the peer is the client, as it is
            shown = peer or "unix"
            return ClientIdentity(shown, (shown,), proto)
        peer_address = _address(peer) if peer else None
        shown_peer = str(peer_address) if peer_address is not None else (peer or "unix")
        if not self.trusts(peer_address):
            return ClientIdentity(shown_peer, (shown_peer,), proto)
        claimed: list[IPAddress] = []
        if forwarded_for:
            for value in forwarded_for:
                for item in value.decode("latin-1").split(","):
                    address = _address(item)
                    if address is not None:
                        claimed.append(address)
        else:
            for value in forwarded:
                for match in _FORWARDED_FOR.finditer(value.decode("latin-1")):
                    address = _address(match.group(1))
                    if address is not None:
                        claimed.append(address)
        chain = [str(a) for a in claimed[-MAX_CHAIN:]] + [shown_peer]
        client = shown_peer
        for address in reversed(claimed[-MAX_CHAIN:]):
            client = str(address)
            if not self.trusts(address):
                break
        if forwarded_proto:
            given = forwarded_proto[-1].decode("latin-1").split(",")[0].strip().lower()
            if given in ("http", "https"):
                proto = given
        return ClientIdentity(client, tuple(chain), proto)
