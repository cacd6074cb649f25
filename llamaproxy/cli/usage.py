"""``llamaproxy usage``: requests and tokens per key_id, UTC day and model, from the usage ledger.

Reads the SQLite ledger the gateway writes (:mod:`llamaproxy.observability.usage`); safe while the
gateway runs
(WAL: readers never block the writer). The newest ``flush_interval`` seconds (2 s by default) of
a running gateway are not in the file yet.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, TextIO

from llamaproxy.cli.guard import CommandError, guarded
from llamaproxy.config import data_file_from_env
from llamaproxy.observability.usage import (
    LEDGER_FILE_NAME,
    UsageRow,
    grand_total,
    query,
    totals_by_key,
)

_DAYS_AGO = re.compile(r"([0-9]+)d", re.IGNORECASE)


class UsageCommandError(CommandError):
    """A user error: printed as ``error: <message>`` on stderr, exit code 1."""


def default_ledger_file(
    environ: Mapping[str, str] | None = None,
    data_dir_exists: Callable[[str], bool] = os.path.isdir,
) -> str:
    """``$USAGE_LEDGER``, else ``$DATA_DIR/usage.sqlite3`` (DATA_DIR detected like the gateway)."""
    return data_file_from_env(
        os.environ if environ is None else environ, "USAGE_LEDGER", LEDGER_FILE_NAME,
        data_dir_exists,
    )


#: Where scripts/quickstart.sh keeps its data (DATA_DIR=$PWD/data), relative to the directory
#: it was started from.
QUICK_START_DATA_DIR = "data"


def quick_start_ledger(environ: Mapping[str, str] | None = None) -> str | None:
    """``./data/usage.sqlite3`` when nothing says where the ledger is and that file exists.

    The quick start runs the gateway with ``DATA_DIR=$PWD/data``; a shell without that variable
    would otherwise look in ``/data``.
    """
    env = os.environ if environ is None else environ
    if env.get("USAGE_LEDGER", "").strip() or env.get("DATA_DIR", "").strip():
        return None
    candidate = os.path.join(QUICK_START_DATA_DIR, LEDGER_FILE_NAME)
    return candidate if os.path.isfile(candidate) else None


def parse_day(text: str, today: date, option: str) -> date:
    """A day for --since/--until: ``YYYY-MM-DD``, ``today``, ``yesterday`` or ``<N>d`` (the
    last N UTC days, today included: ``1d`` is today, ``7d`` six days ago)."""
    value = text.strip().lower()
    if value == "today":
        return today
    if value == "yesterday":
        return today - timedelta(days=1)
    relative = _DAYS_AGO.fullmatch(value)
    if relative is not None:
        days = int(relative[1])
        if days < 1:
            raise UsageCommandError(f"{option} {text!r}: the number of days must be at least 1")
        try:
            return today - timedelta(days=days - 1)
        except OverflowError:
            raise UsageCommandError(f"{option} {text!r}: too far back") from None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise UsageCommandError(
            f"{option} {text!r} is not valid: use YYYY-MM-DD, today, yesterday or <N>d (e.g. 7d)"
        ) from None


def _today() -> date:
    return datetime.now(UTC).date()


def _row_json(row: UsageRow, *, with_day: bool = True, with_key: bool = True) -> dict[str, object]:
    record: dict[str, object] = {}
    if with_day:
        record["day"] = row.day
    if with_key:
        record["key_id"] = row.key_id
    if with_day:
        record["model"] = row.model
    record.update(
        requests=row.requests,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        total_tokens=row.total_tokens,
    )
    return record


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int) -> list[str]:
    """Columns padded to their widest cell; numbers (columns >= numeric_from) right-aligned."""
    table = [list(header), *[list(row) for row in rows]]
    widths = [max(len(row[column]) for row in table) for column in range(len(header))]
    lines = []
    for row in table:
        cells = [
            cell.rjust(width) if column >= numeric_from else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _numbers(row: UsageRow) -> list[str]:
    return [
        str(row.requests), str(row.prompt_tokens), str(row.completion_tokens),
        str(row.total_tokens),
    ]


_NUMBER_HEADERS = ("REQUESTS", "PROMPT", "COMPLETION", "TOTAL")


def show_usage(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Print the ledger's totals per day, key_id and model, then per key_id and overall."""
    path: str = args.file or default_ledger_file()
    if not args.file and not os.path.exists(path):
        quick_start = quick_start_ledger()
        if quick_start is not None:
            print(f"(reading {quick_start}, the quick start's ledger: DATA_DIR is not set)",
                  file=err)
            path = quick_start
    today = _today()
    since = None if args.since is None else parse_day(args.since, today, "--since")
    until = None if args.until is None else parse_day(args.until, today, "--until")
    if since is not None and until is not None and since > until:
        raise UsageCommandError(f"--since {since} is after --until {until}")
    state_url = args.state_url or (os.environ.get("STATE_URL") if args.file is None else None)
    try:
        if state_url:
            rows, path = _shared_rows(state_url, args.key, since, until)
        else:
            rows = query(path, args.key, since, until)
    except FileNotFoundError:
        raise UsageCommandError(
            f"no usage ledger at {path} (set --file, USAGE_LEDGER or DATA_DIR; the gateway "
            "creates it when it starts)"
        ) from None
    except sqlite3.Error as error:
        raise UsageCommandError(f"cannot read the usage ledger {path}: {error}") from None
    per_key = totals_by_key(rows)
    total = grand_total(rows)

    if args.json:
        document = {
            "ledger": path,
            "key": args.key,
            "since": None if since is None else since.isoformat(),
            "until": None if until is None else until.isoformat(),
            "rows": [_row_json(row) for row in rows],
            "by_key": [_row_json(row, with_day=False) for row in per_key.values()],
            "total": _row_json(total, with_day=False, with_key=False),
        }
        out.write(json.dumps(document, indent=2) + "\n")
        return 0

    if not rows:
        out.write(f"No usage recorded in {path}{_describe_filters(args.key, since, until)}.\n")
        return 0
    lines = _table(
        ("DAY", "KEY_ID", "MODEL", *_NUMBER_HEADERS),
        [[row.day, row.key_id, row.model, *_numbers(row)] for row in rows],
        numeric_from=3,
    )
    lines.append("")
    lines.append("Totals per key:")
    lines.extend(
        _table(
            ("KEY_ID", *_NUMBER_HEADERS),
            [[key, *_numbers(row)] for key, row in per_key.items()] + [["ALL", *_numbers(total)]],
            numeric_from=1,
        )
    )
    out.write("\n".join(lines) + "\n")
    return 0


def _shared_rows(
    text: str, key: str | None, since: date | None, until: date | None
) -> tuple[list[UsageRow], str]:
    """The usage counters every replica adds to in Redis (STATE_URL), and where they are."""
    from llamaproxy.cli.redis_session import with_redis
    from llamaproxy.state.url import parse_state_url
    from llamaproxy.state.usage_counters import read_usage

    async def read(state: Any) -> list[UsageRow]:
        return await read_usage(state, key, since, until)

    rows = with_redis(text, "read the usage counters", read, UsageCommandError)
    url = parse_state_url(text)
    return rows, url.display() if url is not None else text


def _describe_filters(key: str | None, since: date | None, until: date | None) -> str:
    parts = []
    if key is not None:
        parts.append(f"for key_id '{key}'")
    if since is not None:
        parts.append(f"from {since}")
    if until is not None:
        parts.append(f"until {until}")
    return (" " + " ".join(parts)) if parts else ""




def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``usage`` to the top-level parser."""
    parser = commands.add_parser(
        "usage",
        help="show requests and tokens per key, day and model",
        description="Show requests and tokens per key_id, UTC day and model from the gateway's "
        "usage ledger, then totals per key_id. Safe while the gateway runs; its last couple of "
        "seconds may not be written yet.",
    )
    parser.add_argument(
        "--file",
        metavar="PATH",
        help="usage ledger (default: $USAGE_LEDGER, else $DATA_DIR/usage.sqlite3, DATA_DIR being "
        "/data, /runpod-volume or /workspace, whichever exists first)",
    )
    parser.add_argument(
        "--state-url",
        metavar="URL",
        help="read the usage counters all replicas share in Redis (redis://..., default: "
        "$STATE_URL when set and --file is not) instead of one gateway's SQLite ledger",
    )
    parser.add_argument("--key", metavar="ID", help="only this key_id")
    day_help = "YYYY-MM-DD (UTC), today, yesterday, or <N>d for the last N days"
    parser.add_argument("--since", metavar="DAY", help=f"first day included: {day_help}")
    parser.add_argument("--until", metavar="DAY", help=f"last day included: {day_help}")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(handler=guarded(show_usage), help_parser=parser)
