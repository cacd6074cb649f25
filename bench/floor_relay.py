"""The floor: a raw-epoll TCP relay in Python with no feature at all.

``python bench/floor_relay.py PORT BACKEND_PORT`` accepts connections on 127.0.0.1:PORT; on a
connection's first read it opens a new connection to 127.0.0.1:BACKEND_PORT (blocking connect,
TCP_NODELAY) and sends what it read there; from then on every read on either side is sent to the
other as it is, and a close on either side closes both. No HTTP parsing, no timers, no logging:
the requests must be ``Connection: close`` (as the stream load's are), since the relay never
knows where a response ends.

It is not a gateway. ``bench/stream_cost.py`` measures it as the lower bound of what a Python
process pays for the same system calls (an epoll wait, a ``recv`` and a ``send`` per event).
"""

from __future__ import annotations

import select
import socket
import sys
from typing import Any

#: fd -> [its socket, the other side (None until the first read), True for a client side]
Sockets = dict[int, list[Any]]


def serve(port: int, backend_port: int) -> None:
    """Relay forever."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    sockets: Sockets = {}
    while True:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                _accept(listener, poller, sockets)
                continue
            entry = sockets.get(fd)
            if entry is None:
                continue
            sock, other, is_client = entry
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                _close(fd, poller, sockets)
                if other is not None:
                    _close(other.fileno(), poller, sockets)
                continue
            if other is None and is_client:
                other = socket.create_connection(("127.0.0.1", backend_port))
                other.setblocking(False)
                other.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                entry[1] = other
                sockets[other.fileno()] = [other, sock, False]
                poller.register(other.fileno(), select.EPOLLIN)
            if other is None:
                continue  # a backend that speaks first: nobody to tell
            try:
                other.sendall(data)  # (small events: the kernel takes them whole)
            except OSError:
                _close(fd, poller, sockets)


def _accept(listener: socket.socket, poller: select.epoll, sockets: Sockets) -> None:
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sockets[sock.fileno()] = [sock, None, True]
        poller.register(sock.fileno(), select.EPOLLIN)


def _close(fd: int, poller: select.epoll, sockets: Sockets) -> None:
    entry = sockets.pop(fd, None)
    if entry is not None:
        poller.unregister(fd)
        entry[0].close()


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
