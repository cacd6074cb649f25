"""``llamaproxy keys``: generate, list, rotate and remove API keys in the gateway's key file.

The flags and behaviour are the older gateway's ``scripts/key_mgmt.py``; the file rules come from
:mod:`llamaproxy.auth.keys` and every edit goes through :mod:`llamaproxy.auth.keyfile` (locked,
atomic, mode 0600, other lines untouched). Key values are printed only by ``generate`` and
``rotate``, once; ``list`` never shows them.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO, cast

from llamaproxy.auth import keyfile
from llamaproxy.auth.keys import parse_expiration, parse_keys
from llamaproxy.cli.guard import CommandError, Handler, guarded
from llamaproxy.config import data_file_from_env

_RELATIVE = re.compile(r"(\d+)([dhm])", re.IGNORECASE)
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}

class KeyCommandError(CommandError):
    """A user error: printed as ``error: <message>`` on stderr, exit code 1, no traceback."""


def default_key_file(
    environ: Mapping[str, str] | None = None,
    data_dir_exists: Callable[[str], bool] = os.path.isdir,
) -> str:
    """``$AUTH_KEYS_FILE``, else ``$DATA_DIR/api_keys.txt`` (DATA_DIR detected like the gateway)."""
    return data_file_from_env(
        os.environ if environ is None else environ, "AUTH_KEYS_FILE", "api_keys.txt",
        data_dir_exists,
    )


def older_format(lines: list[str]) -> bool:
    """True for a key file in the older gateway's format (written by its ``key_mgmt.py`` or by
    hand): it does not start with a llamaproxy header and no expiration in it has a UTC offset.

    The older ``key_mgmt.py list`` (and the older gateway) compare expirations with a naive
    ``datetime.now()`` and crash on a timestamp with an offset, so such a file must not get one.
    """
    first = next((line.strip() for line in lines if line.strip()), "")
    if first.startswith("# llamaproxy"):
        return False
    for line in lines:
        if line.lstrip().startswith("#"):
            continue
        fields = keyfile.split_fields(line)
        if len(fields) > 3 and fields[3] and _has_offset(fields[3]):
            return False
    return True


def _has_offset(text: str) -> bool:
    """True for an ISO 8601 timestamp with a UTC offset (``Z`` included); False otherwise."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        return True
    try:
        return datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


def resolve_expires(text: str, now: datetime, older: bool = False) -> str:
    """The expiration to write for ``--expires``: ``<N>d|h|m`` from ``now`` as an ISO 8601
    timestamp with a UTC offset, or an ISO 8601 timestamp the gateway accepts, kept as typed.

    ``older`` (the file is in the older format, see ``older_format``): the older format instead,
    a naive ISO timestamp (in UTC, which is how llamaproxy reads a naive one).
    """
    value = text.strip()
    relative = _RELATIVE.fullmatch(value)
    if relative is not None:
        amount, unit = int(relative[1]), _UNITS[relative[2].lower()]
        if amount <= 0:
            raise KeyCommandError(f"--expires {text!r}: the duration must be positive")
        try:
            when = now.astimezone(UTC).replace(microsecond=0) + timedelta(**{unit: amount})
        except (OverflowError, ValueError):
            raise KeyCommandError(f"--expires {text!r}: too far in the future") from None
        return when.replace(tzinfo=None).isoformat() if older else when.isoformat()
    try:
        parse_expiration(value)
    except ValueError:
        raise KeyCommandError(
            f"--expires {text!r} is not valid: use <N>d, <N>h, <N>m (e.g. 30d) or an ISO 8601 "
            "timestamp such as 2026-12-31T23:59:59+00:00 (no offset means UTC)"
        ) from None
    if older and _has_offset(value):
        return parse_expiration(value).astimezone(UTC).replace(tzinfo=None).isoformat()
    return value


def parse_rate_limit(text: str) -> int:
    """``--rate-limit``: a positive integer (requests per minute)."""
    value = text.strip()
    if not re.fullmatch(r"[0-9]+", value) or int(value) <= 0:
        raise KeyCommandError(
            f"--rate-limit must be a positive integer (requests per minute), got {text!r}"
        )
    return int(value)


def check_key_id(key_id: str) -> str:
    """``--name``: a key_id of 1-64 characters from A-Z a-z 0-9 - _."""
    if not keyfile.valid_key_id(key_id):
        raise KeyCommandError(
            f"invalid key_id {key_id!r}: use 1-{keyfile.KEY_ID_MAX_LENGTH} characters from "
            "A-Z a-z 0-9 - _"
        )
    return key_id


def describe(rate_limit: int | None, expires: str | None) -> str:
    """The ``(rate_limit=…, expires=…)`` suffix of generate and rotate messages."""
    limit = f"{rate_limit}/min" if rate_limit is not None else "default"
    return f"(rate_limit={limit}, expires={expires or 'never'})"


def _now() -> datetime:
    return datetime.now(UTC)


def _key_file(args: argparse.Namespace) -> str:
    path: str | None = args.file
    return path if path else default_key_file()


def _warn_if_past(expires: str | None, err: TextIO) -> None:
    if expires is not None and parse_expiration(expires) <= _now():
        err.write(f"warning: expiration {expires} is in the past: the key is already expired\n")


def _require_file(path: str) -> None:
    if not os.path.exists(path):
        raise KeyCommandError(f"no key file at {path} (set --file or AUTH_KEYS_FILE)")


def generate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Add a key line for a new key_id, creating the file if needed; print the key once."""
    key_id = check_key_id(args.name)
    rate_limit = None if args.rate_limit is None else parse_rate_limit(args.rate_limit)
    expires = None if args.expires is None else resolve_expires(args.expires, _now())
    path = _key_file(args)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with keyfile.locked(path):
        existed = os.path.exists(path)
        lines = keyfile.read_lines(path) if existed else list(keyfile.HEADER)
        if args.expires is not None and existed and older_format(lines):
            expires = resolve_expires(args.expires, _now(), older=True)
        if keyfile.find_lines(lines, key_id):
            raise KeyCommandError(
                f"key_id '{key_id}' already exists in {path}; use `llamaproxy keys rotate "
                f"--name {key_id}` to replace its key"
            )
        api_key = keyfile.new_api_key()
        lines.append(keyfile.format_line(key_id, api_key, rate_limit, expires))
        keyfile.atomic_write(path, lines)
    if args.quiet:
        out.write(f"{api_key}\n")
    else:
        out.write(f"Generated key for '{key_id}': {api_key} {describe(rate_limit, expires)}\n")
        _warn_if_past(expires, err)
    return 0


def list_keys(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Print the keys' ids, limits, expirations and status; never a key value."""
    path = _key_file(args)
    if not os.path.exists(path):
        if not args.quiet:
            out.write(
                f"No key file at {path}. Create it with: llamaproxy keys --file {path} "
                "generate --name NAME\n"
            )
        out.write("0 key(s) configured\n")
        return 0
    keys, warnings = parse_keys(keyfile.read_lines(path))
    for warning in warnings:
        err.write(f"warning: {path}: {warning}\n")
    now = _now()
    rows = [
        (
            key.key_id,
            "default" if key.rate_limit is None else f"{key.rate_limit}/min",
            "-" if key.expires is None else key.expires.isoformat(),
            "expired" if key.expired(now) else "active",
        )
        for key in keys.by_digest.values()
    ]
    if not args.quiet:
        if rows:
            table = [("KEY_ID", "RATE_LIMIT", "EXPIRES", "STATUS"), *rows]
            widths = [max(len(row[column]) for row in table) for column in range(4)]
            for row in table:
                cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                out.write("  ".join(cells).rstrip() + "\n")
        else:
            out.write(f"No keys in {path}.\n")
    out.write(f"{len(rows)} key(s) configured\n")
    return 0


def _lines_of(path: str, key_id: str) -> tuple[list[str], list[int]]:
    """The key file's lines and the indexes of ``key_id``'s (an error when it has none)."""
    lines = keyfile.read_lines(path)
    found = keyfile.find_lines(lines, key_id)
    if not found:
        raise KeyCommandError(f"key_id '{key_id}' not found in {path}")
    return lines, found


def rotate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Give a key_id a new key, keeping its rate limit and (unless --expires) its expiration."""
    key_id = check_key_id(args.name)
    new_expires = None if args.expires is None else resolve_expires(args.expires, _now())
    path = _key_file(args)
    _require_file(path)
    with keyfile.locked(path):
        lines, found = _lines_of(path, key_id)
        if args.expires is not None and older_format(lines):
            new_expires = resolve_expires(args.expires, _now(), older=True)
        fields = keyfile.split_fields(lines[found[0]])
        old_limit = fields[2] if len(fields) > 2 else ""
        try:
            rate_limit = parse_rate_limit(old_limit) if old_limit else None
        except KeyCommandError:
            raise KeyCommandError(
                f"the line for '{key_id}' in {path} has an invalid rate_limit; fix the line, "
                "or remove the key and generate a new one"
            ) from None
        expires = new_expires
        if expires is None and len(fields) > 3 and fields[3]:
            expires = fields[3]
            try:
                parse_expiration(expires)
            except ValueError:
                raise KeyCommandError(
                    f"the line for '{key_id}' in {path} has an invalid expiration; "
                    "give a new one with --expires"
                ) from None
        api_key = keyfile.new_api_key()
        lines[found[0]] = keyfile.format_line(key_id, api_key, rate_limit, expires)
        for index in reversed(found[1:]):  # one key_id, one key: older duplicates go too
            del lines[index]
        keyfile.atomic_write(path, lines)
    if args.quiet:
        out.write(f"{api_key}\n")
    else:
        out.write(f"Rotated key for '{key_id}': {api_key} {describe(rate_limit, expires)}\n")
        if len(found) > 1:
            out.write(f"({len(found)} lines for '{key_id}' were replaced by this one)\n")
        _warn_if_past(expires, err)
    return 0


def remove(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Delete the line(s) of a key_id."""
    key_id = check_key_id(args.name)
    path = _key_file(args)
    _require_file(path)
    with keyfile.locked(path):
        lines, found = _lines_of(path, key_id)
        for index in reversed(found):
            del lines[index]
        keyfile.atomic_write(path, lines)
    if not args.quiet:
        suffix = f" ({len(found)} lines)" if len(found) > 1 else ""
        out.write(f"Removed key '{key_id}'{suffix}\n")
    return 0




class _Renaming:
    """A text stream that says "the keys in redis://..." where a command names its file."""

    def __init__(self, stream: TextIO, path: str, name: str) -> None:
        self.stream = stream
        self.path = path
        self.name = name

    def write(self, text: str) -> int:
        return self.stream.write(text.replace(self.path, self.name))

    def flush(self) -> None:
        self.stream.flush()


def store_name(text: str) -> str:
    """A Redis URL as shown to people (no credentials)."""
    from llamaproxy.state.url import parse_state_url

    try:
        url = parse_state_url(text)
    except ValueError:
        return "Redis"
    return url.display() if url is not None else "Redis"


def _in_store(handler: Handler) -> Handler:
    """``handler``, on the keys kept in Redis when ``--store`` (or KEYS_STORE=redis with
    STATE_URL) says so: the text is fetched, edited by the same command as a file (in a private
    temporary file), and written back only if nobody changed it meanwhile."""

    def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
        store = getattr(args, "store", None)
        if not store and args.file is None and os.environ.get("KEYS_STORE") == "redis":
            store = os.environ.get("STATE_URL")
        if not store:
            return handler(args, out, err)
        from llamaproxy.cli.redis_session import with_redis
        from llamaproxy.state.key_store import fetch_keys, put_keys

        async def edit(state: Any) -> int:
            version, text = await fetch_keys(state)
            # No keys in Redis yet: start from the header a new key file gets.
            initial = (text or "").splitlines() if version != "0" else list(keyfile.HEADER)
            where = store_name(store)
            with tempfile.TemporaryDirectory(prefix="llamaproxy-keys-") as directory:
                path = os.path.join(directory, "api_keys.txt")
                keyfile.atomic_write(path, initial)
                args.file = path
                try:
                    code = handler(args, cast(TextIO, _Renaming(out, path, where)),
                                   cast(TextIO, _Renaming(err, path, where)))
                except CommandError as error:
                    raise KeyCommandError(str(error).replace(path, where)) from None
                changed = keyfile.read_lines(path)
            if changed != initial and not await put_keys(
                state, version, "\n".join(changed) + "\n"
            ):
                raise KeyCommandError(
                    "the keys in Redis changed while this command ran; nothing was written, "
                    "run it again"
                )
            return code

        return with_redis(store, "use the keys", edit, KeyCommandError)

    return run


def _add_global_options(parser: argparse.ArgumentParser, *, repeated: bool) -> None:
    """--file and --quiet; ``repeated`` copies (after the sub-command) only set what is given."""
    group = parser.add_argument_group("global options")
    group.add_argument(
        "--file",
        metavar="PATH",
        default=argparse.SUPPRESS if repeated else None,
        help="key file (default: $AUTH_KEYS_FILE, else $DATA_DIR/api_keys.txt, DATA_DIR being "
        "/data, /runpod-volume or /workspace, whichever exists first)",
    )
    group.add_argument(
        "--store",
        metavar="URL",
        default=argparse.SUPPRESS if repeated else None,
        help="manage the keys kept in Redis (redis://... or rediss://..., as STATE_URL) instead "
        "of a file; default: $STATE_URL when KEYS_STORE=redis and no --file is given",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS if repeated else False,
        help="print only the key (generate, rotate) or the count (list)",
    )


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keys`` and its sub-commands to the top-level parser."""
    parser = commands.add_parser(
        "keys",
        help="manage API keys in the key file",
        description="Manage the gateway's API key file. A running gateway picks changes up by "
        "itself (KEYS_RELOAD_INTERVAL), or at once on SIGHUP or POST /reload.",
    )
    _add_global_options(parser, repeated=False)
    parser.set_defaults(handler=None, help_parser=parser)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text)
        _add_global_options(command, repeated=True)
        command.set_defaults(handler=guarded(_in_store(handler)))
        return command

    name_help = "key_id: 1-64 characters from A-Z a-z 0-9 - _"
    expires_help = (
        "expiration: <N>d, <N>h or <N>m from now (written as an ISO 8601 UTC timestamp), or an "
        "ISO 8601 timestamp kept as typed (no offset means UTC)"
    )

    gen = add("generate", generate, "create a key for a new key_id and print it once")
    gen.add_argument("--name", required=True, help=name_help)
    gen.add_argument(
        "--rate-limit",
        metavar="N",
        help="requests per minute for this key (default: the gateway's MAX_REQUESTS_PER_MINUTE)",
    )
    gen.add_argument("--expires", metavar="WHEN", help=expires_help + " (default: never)")

    add("list", list_keys, "list key ids, rate limits, expirations and status (never the keys)")

    rot = add("rotate", rotate, "replace a key_id's key, keeping its rate limit")
    rot.add_argument("--name", required=True, help=name_help)
    rot.add_argument("--expires", metavar="WHEN", help=expires_help + " (default: keep)")

    rem = add("remove", remove, "remove a key_id's key")
    rem.add_argument("--name", required=True, help=name_help)
