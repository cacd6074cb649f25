"""The startup contract check: does the installed Twisted have the shape the fast paths assume?

Each fast path replaces or imitates a piece of Twisted (see the table in
``llamaproxy.fastpath``). A Twisted release can rename what it uses (a request would crash) or
change what it imitates (a fix in ``doPoll`` or a new write buffer would be silently lost, or
bytes reordered). So before turning them on, ``check`` verifies:

- the Twisted version is inside the tested range (``TESTED_RANGE``, the bounds of setup.py);
- the reactor is the epoll reactor, with its own ``doPoll``;
- every private name used exists, with the expected kind;
- every Twisted function that a fast path replaces or copies has the source the fast path was
  written against (a SHA-256 of ``inspect.getsource``): any change to it, however small, turns
  the fast paths off until someone has read the change and updated the fast path.

Widening the range (docs/operations.md): install the new Twisted, run ``check`` (the failures
name what differs), read each differing function, update the fast path and its fingerprint,
and run the scenario and differential suites both ways.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

#: Twisted versions the fast paths are tested with: (lowest, first untested), as in setup.py.
TESTED_RANGE = ((26, 10), (26, 11))

#: The Twisted release the fingerprints below were taken from. Another release (26.4, tried:
#: ``Connection.doRead``, ``_dataReceived`` and ``connectionLost`` differ) runs the stock path
#: until the fast paths are checked against it.
FINGERPRINTED_WITH = "26.10.0"

#: The source the fast paths were written against: a SHA-256 prefix of ``inspect.getsource``.
FINGERPRINTS = {
    # lean_poll: its loop is doPoll's, and it inlines _doReadOrWrite's read branch.
    "twisted.internet.epollreactor:EPollReactor.doPoll": "09b62ae68ef01b4b",
    "twisted.internet.epollreactor:EPollReactor._doReadOrWrite": "5ffee55b79492b00",
    # eager_write: its do_read is doRead + _dataReceived; send_now decides like write/doWrite.
    "twisted.internet.tcp:Connection.doRead": "20ac74ffecd6b7f2",
    "twisted.internet.tcp:Connection._dataReceived": "7ed147aeca0c7f8a",
    "twisted.internet.abstract:FileDescriptor.write": "3e46c97fc173bc7e",
    "twisted.internet.abstract:FileDescriptor.writeSequence": "1606f230d318191a",
    "twisted.internet.abstract:FileDescriptor.doWrite": "a986d7b1b1054e43",
    "twisted.internet.tcp:Connection.connectionLost": "dd7a9a87035a2084",
    # (and the instance attributes it reads: _tempDataBuffer is set here)
    "twisted.internet.abstract:FileDescriptor.__init__": "6405435a8c04d4c9",
    # backend_client cuts the wrapping factory's cycles when a connection is lost: the two
    # attributes it clears are set here.
    "twisted.internet.endpoints:_WrappingFactory.__init__": "0bbd6221855ef20f",
    "twisted.internet.endpoints:_WrappingFactory.startedConnecting": "cde536743db20b04",
    # ... and dials a plain TCP4ClientEndpoint itself: what connect passes to connectTCP (the
    # attributes set in __init__), how the wrapping factory fails and cancels.
    "twisted.internet.endpoints:TCP4ClientEndpoint.__init__": "2200707dc25a8198",
    "twisted.internet.endpoints:TCP4ClientEndpoint.connect": "c45490800642afa3",
    "twisted.internet.endpoints:_WrappingFactory._canceller": "ea15e9426843976c",
    "twisted.internet.endpoints:_WrappingFactory.clientConnectionFailed": "5d9ac0dbdef7f1b9",
    # header_fill does what addRawHeader does, minus the sanitizing llhttp made needless.
    "twisted.web.http_headers:Headers.addRawHeader": "c4fe96cc1a6e7950",
    "twisted.web.http_headers:_NameEncoder.encode": "7b453627217624ac",
    "twisted.web.http_headers:_sanitizeLinearWhitespace": "eae40a7049d09f94",
    # ... and what setHeader and setRawHeaders do for the gateway's own response headers.
    "twisted.web.http_headers:Headers.setRawHeaders": "0a56d26c55e15b59",
    "twisted.web.http:Request.setHeader": "eb86f09aeab0f711",
    # first_write skips server.Request.write when it would only pass the data on, and does
    # http.Request.write's first write without its Content-Length lookup.
    "twisted.web.server:Request.write": "e0629de84fb9e31d",
    "twisted.web.http:Request.write": "0e547d4f76bd1472",
    # ... and finishes a response as these do, without the site's no-op log.
    "twisted.web.server:Request.finish": "2d92e6905246806d",
    "twisted.web.http:Request.finish": "4590c5f7e2207ef0",
    # request_start sets what these constructors set, and receives a request as
    # requestReceived does when it parses no form.
    "twisted.web.server:Request.__init__": "f79aac5ec350503e",
    "twisted.web.http:Request.__init__": "2d3f7dbd28d0ce02",
    "twisted.python.components:Componentized.__init__": "31cb3de9ee79eae2",
    "twisted.web.http:Request.requestReceived": "99ca6c5e24305de4",
}

#: Private names used, and what each must be: "callable", or "attribute" (anything).
NAMES = {
    "twisted.internet.posixbase:_NO_FILEDESC": "attribute",
    "twisted.internet.epollreactor:EPollReactor._doReadOrWrite": "callable",
    "twisted.internet.epollreactor:EPollReactor._disconnectSelectable": "callable",
    "twisted.internet.tcp:Connection._aborting": "attribute",
    "twisted.internet.tcp:Connection._writeDisconnecting": "attribute",
    "twisted.internet.tcp:Connection._writeDisconnected": "attribute",
    "twisted.internet.endpoints:_WrappingFactory": "callable",
    "twisted.web._newclient:ExcessWrite": "callable",
    "twisted.web._newclient:ParseError": "callable",
    "twisted.web._newclient:RequestGenerationFailed": "callable",
    "twisted.web._newclient:RequestTransmissionFailed": "callable",
    "twisted.web._newclient:WrongBodyLength": "callable",
    "twisted.web.http:_DataLoss": "callable",
    "twisted.web.http_headers:Headers._rawHeaders": "attribute",
    "twisted.web.http_headers:_nameEncoder": "attribute",
    "twisted.web.http_headers:_nameEncoder._canonicalHeaderCache": "attribute",
    "twisted.web.server:Request._inFakeHead": "attribute",
    "twisted.web.server:Request._encoder": "attribute",
    "twisted.web.http:Request._disconnected": "attribute",
    "twisted.web.http:Request._cleanup": "callable",
}

# --- stream15: backend_client's own dialling (``_Dialer``) -------------------------------------
# It does what connectTCP -> Connector.connect -> tcp.Client(...) -> (next turn) resolveAddress
# -> _setRealAddress -> doConnect do for a literal IPv4 address, minus the turn and the Deferred.
FINGERPRINTS.update({
    "twisted.internet.posixbase:PosixReactorBase.connectTCP": "89b44030ea12a788",
    "twisted.internet.base:BaseConnector.connect": "93d3aaa9307baafc",
    "twisted.internet.tcp:Connector.__init__": "4979e482cbc4ad3d",
    "twisted.internet.tcp:Connector._makeTransport": "46ede39bbf87ab8f",
    "twisted.internet.tcp:_BaseTCPClient.__init__": "af5d4ece0d9af607",
    "twisted.internet.tcp:_BaseBaseClient._finishInit": "729a3366eab3f639",
    "twisted.internet.tcp:_BaseBaseClient.resolveAddress": "9ae8071e125d49f8",
    "twisted.internet.tcp:_BaseBaseClient._setRealAddress": "009a5e3923de38d0",
    "twisted.internet.tcp:BaseClient.createInternetSocket": "f7d26d9663e17589",
    "twisted.internet.tcp:BaseClient.doConnect": "9cded3ad6897cb96",
})
# --- end stream15 ---------------------------------------------------------------------------

#: Attributes a running epoll reactor instance must have (set in its __init__).
REACTOR_ATTRIBUTES = ("_selectables", "_poller")

#: Fast path modules that must import (their own imports of private names).
MODULES = (
    "llamaproxy.fastpath.lean_poll",
    "llamaproxy.fastpath.eager_write",
    "llamaproxy.fastpath.stream_lane",
    "llamaproxy.fastpath.backend_client",
    "llamaproxy.fastpath.header_fill",
    "llamaproxy.fastpath.first_write",
    "llamaproxy.fastpath.request_start",
)


def check(reactor: Any, twisted_version: str | None = None) -> list[str]:
    """What does not hold (empty: the fast paths may run), in words for the one warning."""
    failures = []
    version = twisted_version or _installed_twisted()
    if not _in_range(version):
        low, high = TESTED_RANGE
        failures.append(
            f"Twisted {version} is outside the tested range "
            f">={low[0]}.{low[1]},<{high[0]}.{high[1]}"
        )
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:
        return [*failures, "no epoll reactor on this platform"]
    if not isinstance(reactor, EPollReactor):
        failures.append(f"the reactor is {type(reactor).__name__}, not the epoll reactor")
    elif type(reactor).doPoll is not EPollReactor.doPoll or "doPoll" in vars(reactor):
        failures.append("the reactor's doPoll was replaced by someone else")
    else:
        failures += [f"the reactor has no {name}" for name in REACTOR_ATTRIBUTES
                     if not hasattr(reactor, name)]
    for name, kind in NAMES.items():
        found = _resolve(name)
        if found is _MISSING:
            failures.append(f"{name} is gone")
        elif kind == "callable" and not callable(found):
            failures.append(f"{name} is no longer callable")
    for name, expected in FINGERPRINTS.items():
        found = _resolve(name)
        if found is _MISSING:
            failures.append(f"{name} is gone")
        elif fingerprint(found) != expected:
            failures.append(f"{name} changed (source {fingerprint(found)}, expected {expected})")
    for module in MODULES:
        try:
            importlib.import_module(module)
        except Exception as e:
            failures.append(f"{module} does not import: {e}")
    return failures


def fingerprint(function: Callable[..., Any]) -> str:
    """A SHA-256 prefix of ``function``'s source ("?" when it has none)."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return "?"
    return hashlib.sha256(source.encode()).hexdigest()[:16]


_MISSING = object()


def _resolve(name: str) -> Any:
    """``module:attr.attr`` to the object, or ``_MISSING``."""
    module_name, _, path = name.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError:
        return _MISSING
    for part in path.split("."):
        found = getattr(found, part, _MISSING)
        if found is _MISSING:
            return _MISSING
    return found


def _installed_twisted() -> str:
    import twisted

    return str(twisted.__version__)


def _in_range(version: str) -> bool:
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    low, high = TESTED_RANGE
    return low <= (major, minor) < high
