"""The operator page's HTML, server-rendered with ``twisted.web.template``, and its SVG charts.

The whole page is one static document that works without JavaScript; :mod:`page.js
<llamaproxy.admin>` only swaps the sections' HTML for newer renderings (the same functions below,
sent as JSON over Server-Sent Events or polled). Every value goes through the template's escaping.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from twisted.web.template import Tag, flattenString, tags

from llamaproxy import __version__
from llamaproxy.admin.series import Point
from llamaproxy.admin.view import Snapshot

#: Sections the script refreshes, in page order: (id, heading).
SECTIONS = (
    ("backends", "Backends and models"),
    ("chart", "Last 15 minutes"),
    ("activity", "Activity"),
    ("keys", "Keys (last minute)"),
    ("logs", "llama-server logs"),
)

#: What an unknown value shows.
DASH = "\u2013"

CHART_SPAN = 900.0
CHART_WIDTH = 560
CHART_HEIGHT = 70


def to_html(tag: Tag | str) -> str:
    """Flatten a tag tree (synchronous elements only) to HTML text."""
    out: list[bytes] = []
    failures: list[object] = []
    flattenString(None, tag).addCallbacks(out.append, failures.append)
    if failures or not out:
        raise RuntimeError(f"could not render the page: {failures}")
    return out[0].decode("utf-8")


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ts))


def _ms(value: float | None) -> str:
    return DASH if value is None else f"{value:,.0f} ms"


def _num(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return DASH
    return f"{value:,.{digits}f}"


def _table(headings: Sequence[str], rows: list[Tag], empty: str) -> Tag:
    if not rows:
        return tags.p(empty, class_="empty")
    return tags.table(
        tags.thead(tags.tr(*[tags.th(h, scope="col") for h in headings])),
        tags.tbody(*rows),
    )


# --- sections ----------------------------------------------------------------------------------


def backends_section(snapshot: Snapshot, csrf: str) -> Tag:
    """Backends and models: state, slots, queue, breaker, restarts, last error, restart button."""
    rows = []
    for b in snapshot.backends:
        action: Tag | str = DASH
        if b.restartable:
            action = tags.form(
                tags.input(type="hidden", name="csrf", value=csrf),
                tags.input(type="hidden", name="backend", value=b.name),
                tags.button("Restart", type="submit", class_="restart"),
                method="post", action="/restart", class_="confirm",
                **{"data-confirm": f"Restart llama-server of backend '{b.name}'? Its requests "
                                   "in flight are cut and new ones wait until it is ready."},
            )
        rows.append(tags.tr(
            tags.td(b.name, tags.br(), tags.small(b.kind)),
            tags.td(", ".join(b.models)),
            tags.td(tags.span(b.state, class_=f"state state-{b.state}")),
            tags.td(f"{b.busy}/{b.slots}"),
            tags.td(str(b.queued)),
            tags.td(tags.span(b.breaker, class_=f"breaker breaker-{b.breaker}")),
            tags.td(str(b.restarts)),
            tags.td(b.last_error or DASH, class_="error"),
            tags.td(action),
            **{"data-backend": b.name},
        ))
    return tags.div(
        _table(("backend", "models", "state", "slots busy/total", "queued", "breaker",
                "restarts", "last error", ""), rows, "No backends."),
        tags.p("Loading and unloading models needs on-demand backends, which llamaproxy does "
               "not have yet: the only operation here is restarting a supervised child.",
               class_="note"),
    )


def chart_section(snapshot: Snapshot) -> Tag:
    """Four small inline SVG charts over the last 15 minutes."""
    points = snapshot.points
    charts: list[tuple[str, list[float | None], int]] = [
        ("requests/s", [p.requests_per_second for p in points], 1),
        ("tokens/s", [p.tokens_per_second for p in points], 1),
        ("queue depth", [float(p.queue_depth) for p in points], 0),
        ("p95 TTFT (ms)", [p.p95_ttft_ms for p in points], 0),
    ]
    figures = [
        _chart(title, points, values, digits, snapshot.at) for title, values, digits in charts
    ]
    if not points:
        return tags.div(tags.p("No samples yet: the first arrives 10 s after start "
                               "(one every 5 s).", class_="empty"), *figures)
    return tags.div(*figures)


def _span(points: list[Point], now: float) -> float:
    """Seconds the charts cover: 15 minutes, or less when the gateway started more recently."""
    if len(points) < 2:
        return CHART_SPAN
    return max(10.0, min(CHART_SPAN, now - points[0].at))


def _chart(
    title: str, points: list[Point], values: list[float | None], digits: int, now: float
) -> Tag:
    known = [v for v in values if v is not None]
    top = max(known) if known else 0.0
    scale = top if top > 0 else 1.0
    span = _span(points, now)
    start = now - span
    covered = f"last {span / 60:.0f} min" if span >= 120 else f"last {span:.0f} s"
    coordinates = []
    for point, value in zip(points, values, strict=True):
        if value is None:
            continue
        x = max(0.0, (point.at - start) / span) * CHART_WIDTH
        y = CHART_HEIGHT - (value / scale) * (CHART_HEIGHT - 4) - 2
        coordinates.append(f"{x:.1f},{y:.1f}")
    latest = known[-1] if known else None
    shapes: list[Tag] = [
        Tag("rect")(x="0", y="0", width=str(CHART_WIDTH), height=str(CHART_HEIGHT),
                  fill="#f6f8fa", stroke="#d0d7de"),
    ]
    if coordinates:
        shapes.append(Tag("polyline")(points=" ".join(coordinates), fill="none",
                                    stroke="#0969da", **{"stroke-width": "2"}))
    svg = Tag("svg")(
        Tag("title")(f"{title}, {covered}"),
        *shapes,
        xmlns="http://www.w3.org/2000/svg", width=str(CHART_WIDTH), height=str(CHART_HEIGHT),
        viewBox=f"0 0 {CHART_WIDTH} {CHART_HEIGHT}", role="img",
        **{"aria-label": f"{title}, {covered}"},
    )
    return tags.figure(
        tags.figcaption(tags.strong(title), f" ({covered}) now {_num(latest, digits)}, "
                        f"max {_num(top if known else None, digits)}"),
        svg,
        class_="chart",
    )


def activity_section(snapshot: Snapshot) -> Tag:
    """The last requests, newest first, with the key/model filter form."""
    def options(choices: list[str], selected: str) -> list[Tag]:
        found = [tags.option("all", value="")]
        for choice in sorted(set(choices) | ({selected} if selected else set())):
            option = tags.option(choice, value=choice)
            if choice == selected:
                option.attributes["selected"] = "selected"
            found.append(option)
        return found

    filters = tags.form(
        tags.label("key ", tags.select(*options(snapshot.activity_keys, snapshot.key_filter),
                                       name="key")),
        " ",
        tags.label("model ", tags.select(*options(snapshot.activity_models,
                                                  snapshot.model_filter), name="model")),
        " ",
        tags.button("Filter", type="submit"),
        method="get", action="/", class_="filters",
    )
    rows = []
    for a in snapshot.activity:
        status_class = "ok" if a.status < 400 else ("warn" if a.status < 500 else "bad")
        rows.append(tags.tr(
            tags.td(_clock(a.ts)),
            tags.td(a.key_id),
            tags.td(a.model),
            tags.td(a.path),
            tags.td(str(a.status), class_=f"status-{status_class}"),
            tags.td(_ms(a.queue_wait_ms)),
            tags.td(_ms(a.ttft_ms)),
            tags.td(f"{_num(a.prompt_tokens)} / {_num(a.completion_tokens)}"),
            tags.td(_num(a.tokens_per_second, 1)),
            tags.td("yes" if a.client_gone else "no"),
        ))
    return tags.div(
        filters,
        _table(("time (UTC)", "key", "model", "path", "status", "queue wait", "TTFT",
                "tokens in/out", "tokens/s", "client gone"), rows, "No requests yet."),
    )


def keys_section(snapshot: Snapshot) -> Tag:
    """Per key: requests and tokens in the last minute, queued now, 429s; never a secret."""
    rows = [
        tags.tr(tags.td(k.key_id), tags.td(_num(k.requests_per_minute)),
                tags.td(_num(k.tokens_per_minute)), tags.td(str(k.queued)),
                tags.td(_num(k.rate_limited)))
        for k in snapshot.keys
    ]
    covered = snapshot.minute_covered
    note = "" if covered >= 60 else f" (only {covered:.0f} s sampled so far)"
    return tags.div(
        _table(("key", "requests/min", "tokens/min", "queued", "429s/min"), rows,
               "No key has sent a request in the last minute."),
        tags.p(f"Over the last minute, in 5-second steps{note}.", class_="note"),
    )


def logs_section(snapshot: Snapshot) -> Tag:
    """The tail of each child's output (secrets and request bodies redacted)."""
    if not snapshot.logs:
        return tags.div(tags.p("No llama-server child has printed anything.", class_="empty"))
    blocks = []
    for name, lines in snapshot.logs.items():
        text = "\n".join(f"{_clock(line.at)} {line.text}" for line in lines)
        blocks.append(tags.div(tags.h3(name), tags.pre(text, class_="log"), class_="child-log"))
    return tags.div(*blocks)


def section_tags(snapshot: Snapshot, csrf: str) -> dict[str, Tag]:
    """Each section's content, by id."""
    return {
        "backends": backends_section(snapshot, csrf),
        "chart": chart_section(snapshot),
        "activity": activity_section(snapshot),
        "keys": keys_section(snapshot),
        "logs": logs_section(snapshot),
    }


def render_sections(snapshot: Snapshot, csrf: str) -> dict[str, str]:
    """Each section's inner HTML, by id (what the live updates carry)."""
    return {name: to_html(tag) for name, tag in section_tags(snapshot, csrf).items()}


# --- whole pages -------------------------------------------------------------------------------


def _document(
    title: str, *body: Tag | str, scripts: bool = True, body_attrs: dict[str, str] | None = None
) -> str:
    head = [
        tags.meta(charset="utf-8"),
        tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
        tags.title(title),
        tags.link(rel="stylesheet", href="/static/page.css"),
    ]
    if scripts:
        head.append(tags.script(src="/static/page.js", defer="defer"))
    page = tags.html(tags.head(*head), tags.body(*body, **(body_attrs or {})), lang="en")
    return "<!DOCTYPE html>\n" + to_html(page)


def dashboard_page(snapshot: Snapshot, key_id: str, csrf: str, notice: str = "") -> str:
    """The whole operator page (a static snapshot until the script makes it live)."""
    sections = section_tags(snapshot, csrf)
    header = tags.header(
        tags.h1("llamaproxy ", tags.small(__version__)),
        tags.p(
            f"Logged in with key '{key_id}'. ",
            tags.span(f"Static snapshot at {_clock(snapshot.at)} UTC: reload for newer figures.",
                      id="live-status"),
        ),
        tags.form(tags.input(type="hidden", name="csrf", value=csrf),
                  tags.button("Log out", type="submit"), method="post", action="/logout",
                  class_="logout"),
    )
    body: list[Tag | str] = [header]
    if notice:
        body.append(tags.p(notice, class_="notice", role="status"))
    for section_id, heading in SECTIONS:
        fragment = tags.div(sections[section_id], id=f"frag-{section_id}")
        body.append(tags.section(tags.h2(heading), fragment, id=section_id))
    return _document(
        "llamaproxy operator", *body,
        body_attrs={"data-key": snapshot.key_filter, "data-model": snapshot.model_filter},
    )


def login_page(login_token: str, error: str = "") -> str:
    """The login form: an admin API key, once."""
    form = tags.form(
        tags.input(type="hidden", name="login", value=login_token),
        tags.label("Admin API key ", tags.input(type="password", name="api_key",
                                                autocomplete="current-password",
                                                required="required", autofocus="autofocus")),
        " ",
        tags.button("Log in", type="submit"),
        method="post", action="/login",
    )
    body: list[Tag | str] = [tags.h1("llamaproxy operator page")]
    if error:
        body.append(tags.p(error, class_="error", role="alert"))
    body.append(form)
    body.append(tags.p("Only keys listed in ADMIN_KEY_IDS may log in. The key is checked once; "
                       "the page then uses a session cookie.", class_="note"))
    return _document("llamaproxy operator: log in", *body, scripts=False)


def confirm_page(backend: str, csrf: str) -> str:
    """The confirmation step of a restart sent without JavaScript (no ``confirm`` field)."""
    return _document(
        "Restart backend?",
        tags.h1(f"Restart backend '{backend}'?"),
        tags.p("Its llama-server child is stopped (requests in flight are cut) and started again; "
               "new requests wait until it is ready."),
        tags.form(
            tags.input(type="hidden", name="csrf", value=csrf),
            tags.input(type="hidden", name="backend", value=backend),
            tags.input(type="hidden", name="confirm", value="yes"),
            tags.button("Yes, restart", type="submit"),
            " ", tags.a("Cancel", href="/"),
            method="post", action="/restart",
        ),
        scripts=False,
    )


def message_page(title: str, message: str) -> str:
    """A short page for refusals and errors."""
    return _document(title, tags.h1(title), tags.p(message), tags.p(tags.a("Back", href="/")),
                     scripts=False)
