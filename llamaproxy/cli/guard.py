"""User errors of the command-line tools: one line on stderr and exit code 1, never a traceback."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TextIO

#: A sub-command: (parsed arguments, stdout, stderr) -> exit code.
Handler = Callable[[argparse.Namespace, TextIO, TextIO], int]


class CommandError(Exception):
    """A user error: printed as ``error: <message>`` on stderr, exit code 1."""


def guarded(command: Handler) -> Handler:
    """Turn user errors and file-system errors into a one-line message and exit code 1."""

    def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
        try:
            return command(args, out, err)
        except CommandError as error:
            err.write(f"error: {error}\n")
        except OSError as error:
            where = f": {error.filename}" if error.filename else ""
            err.write(f"error: {error.strerror or error}{where}\n")
        return 1

    run.__doc__ = command.__doc__
    return run
