"""The ``llamaproxy`` command line: operator tools that run beside the gateway (``keys``,
``usage``, ``bench``, ``models``).

The gateway itself runs under ``twistd llamaproxy``; this entry point (the ``llamaproxy`` console
script and ``python -m llamaproxy``) never starts a reactor. Each sub-command module registers its
parser with :func:`build_parser` and a handler ``(args, stdout, stderr) -> exit code``. Exit codes:
0 success, 1 user error (message on stderr, never a traceback), 2 malformed arguments (argparse).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from typing import TextIO

from llamaproxy import __version__
from llamaproxy.cli import bench, keys, models, usage

#: Sub-commands and the functions that add their parsers.
COMMANDS = {"keys": keys.register, "usage": usage.register, "bench": bench.register,
            "models": models.register}

PROG = "llamaproxy"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Operator tools for the llamaproxy gateway (the gateway itself runs under "
        "`twistd llamaproxy`).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.set_defaults(handler=None, help_parser=parser)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for register in COMMANDS.values():
        register(commands)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()

    if not arguments or not (arguments[0].startswith("-") or arguments[0] in COMMANDS):
        if arguments:
            err.write(f"{PROG}: unknown command {arguments[0]!r}\n\n")
        parser.print_help(err)
        return 1

    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            args = parser.parse_args(arguments)
        except SystemExit as exit_:  # --help, --version, or a usage error (2)
            return exit_.code if isinstance(exit_.code, int) else 1

    if args.handler is None:  # a command group without its sub-command, e.g. `llamaproxy keys`
        args.help_parser.print_help(err)
        return 1
    code: int = args.handler(args, out, err)
    return code
