"""``llamaproxy models list|load|unload``: the on-demand models of a running gateway.

Calls the gateway's admin routes (``GET /admin/models``, ``POST /admin/models/load``,
``POST /admin/models/unload``; docs/models.md) with an admin key: ``--key`` or
``$LLAMAPROXY_ADMIN_KEY``. The gateway is ``--url`` or ``$LLAMAPROXY_URL``, else
``http://127.0.0.1:$PORT`` (PORT's default, 8000). ``unload`` returns once the model has drained
and stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from typing import Any, TextIO

from llamaproxy.cli.guard import CommandError, guarded

#: Longest wait for an answer (an unload waits for the model's requests in flight).
TIMEOUT = 600.0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``models`` (``list``, ``load``, ``unload``) to the top-level parser."""
    parser = commands.add_parser(
        "models", help="list, load or unload the on-demand models of a running gateway",
        description="List, load or unload the models a running gateway starts on demand "
        "(start = \"on_demand\" in the backends file), with an admin key.")
    parser.set_defaults(handler=None, help_parser=parser)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, help_text in (("list", "list the on-demand models and their state"),
                            ("load", "start a model (a swap if its group is full)"),
                            ("unload", "drain, then stop a model")):
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name != "list":
            command.add_argument("model", help="backend name, model name or alias")
        command.add_argument("--url", help="the gateway (default: $LLAMAPROXY_URL, else "
                             "http://127.0.0.1:$PORT)")
        command.add_argument("--key", help="an admin API key (default: $LLAMAPROXY_ADMIN_KEY)")
        command.add_argument("--json", action="store_true", help="print the JSON answer")
        command.set_defaults(handler=guarded(run), help_parser=command, action=name)


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Call the admin route of ``args.action`` and print its answer."""
    url = (args.url or os.environ.get("LLAMAPROXY_URL")
           or f"http://127.0.0.1:{os.environ.get('PORT', '8000')}").rstrip("/")
    key = args.key or os.environ.get("LLAMAPROXY_ADMIN_KEY")
    if not key:
        raise CommandError("an admin key is needed: --key or $LLAMAPROXY_ADMIN_KEY")
    if args.action == "list":
        doc = call(url + "/admin/models", key)
    else:
        doc = call(f"{url}/admin/models/{args.action}", key, {"model": args.model})
    if args.json:
        out.write(json.dumps(doc, indent=2) + "\n")
    elif args.action == "list":
        rows = doc.get("data", [])
        out.write(f"{'BACKEND':<24} {'STATE':<9} {'GROUP':<12} {'IN FLIGHT':>9}  MODELS\n")
        for row in rows:
            out.write(f"{row['backend']:<24} {row['state']:<9} {row.get('group') or '-':<12} "
                      f"{row.get('in_flight', 0):>9}  {', '.join(row.get('models', []))}\n")
    else:
        out.write(f"{doc['backend']}: {doc['state']}\n")
    return 0


def call(url: str, key: str, body: dict[str, str] | None = None) -> Any:
    """GET (no body) or POST ``body`` to ``url``; the JSON answer, or CommandError."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    request.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise CommandError(f"{url}: {e.code} {message}") from None
    except urllib.error.URLError as e:
        raise CommandError(f"{url}: {e.reason}") from None
