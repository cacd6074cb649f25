"""Reading an operator's file (keys, certificates, backends) safely: regular files only, bounded.

A configuration path can end up pointing somewhere hostile or broken: a symlink to ``/dev/zero``
(an endless read that takes all memory), a FIFO (a read that blocks until someone writes), a
directory. ``read_bounded`` opens without blocking, refuses anything that is not a regular file,
and never reads more than its limit. Its callers run it on a thread-pool thread (``OffThread``),
so a slow disk or network filesystem never stalls the reactor either.
"""

from __future__ import annotations

import os
import stat

#: The size cap of the key file, a certificate or key PEM, and the backends file.
MAX_CONFIG_FILE_SIZE = 16 * 1024 * 1024


class UnsafeFileError(OSError):
    """The path is not a regular file, or is larger than the limit: it was not read."""


def read_bounded(path: str, limit: int = MAX_CONFIG_FILE_SIZE) -> bytes:
    """The content of the regular file at ``path`` (symlinks followed), at most ``limit`` bytes.

    Raises ``UnsafeFileError`` for a FIFO, device, socket or directory and for a file over the
    limit (checked on the open file, and again while reading, as it may grow), and ``OSError``
    when the file cannot be opened.
    """
    # O_NONBLOCK: opening a FIFO must not wait for a writer; it changes nothing for a file.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError(f"{path} is not a regular file")
        if info.st_size > limit:
            raise UnsafeFileError(f"{path} is larger than {limit} bytes")
        pieces: list[bytes] = []
        size = 0
        while True:
            piece = os.read(fd, min(1 << 20, limit + 1 - size))
            if not piece:
                return b"".join(pieces)
            size += len(piece)
            if size > limit:
                raise UnsafeFileError(f"{path} is larger than {limit} bytes")
            pieces.append(piece)
    finally:
        os.close(fd)
