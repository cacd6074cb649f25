"""Tests for llamaproxy.observability.logs: log observers, their installation under twistd, the
access log and request ids."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import re
import stat
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.application.service import Application, MultiService
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.observability import access_log, logs
from llamaproxy.observability.access_log import (
    AccessEntry,
    AccessLog,
    format_access_json,
    format_access_text,
    request_id_from,
    sanitize_field,
)
from llamaproxy.observability.logs import (
    JSONLogObserver,
    format_json_event,
    format_text_event,
    install_observer,
    iso_timestamp,
    observer_for_twistd,
    parse_log_format,
)
from tests.e2e.harness import twistd as twistd_script

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
T0 = 1_780_000_000.25  # 2026-05-28T20:26:40.250Z


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def entry(**changes: Any) -> AccessEntry:
    values: dict[str, Any] = dict(
        ts=T0, request_id="abc123", key_id="alice", method="POST",
        path="/v1/chat/completions", status=200, duration_ms=1234.56, ttfb_ms=210.04,
        bytes=5120, model="qwen", prompt_tokens=12, completion_tokens=345, outcome="ok",
    )
    values.update(changes)
    return AccessEntry(**values)


class JSONObserverTests(SynchronousTestCase):
    def emit(self, observer: Any = None, **kwargs: Any) -> tuple[io.StringIO, Logger]:
        stream = io.StringIO()
        obs = observer or JSONLogObserver(stream, **kwargs)
        if observer is not None:
            stream = observer.stream
        return stream, Logger(namespace="llamaproxy.test", observer=obs)

    def test_record_fields(self) -> None:
        stream, log = self.emit()
        log.info("Request {method} {path} took {duration_ms}ms", method="GET", path="/x",
                 duration_ms=1.5, status=200, ok=True, nothing=None)
        (record,) = json_lines(stream.getvalue())
        self.assertRegex(record["ts"], TS)
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["msg"], "Request GET /x took 1.5ms")
        self.assertEqual(record["ns"], "llamaproxy.test")
        self.assertEqual(
            {k: record[k] for k in ("method", "path", "duration_ms", "status", "ok", "nothing")},
            {"method": "GET", "path": "/x", "duration_ms": 1.5, "status": 200, "ok": True,
             "nothing": None},
        )
        self.assertFalse([key for key in record if key.startswith("log_")])
        self.assertNotIn("worker_type", record)
        self.assertNotIn("instance_id", record)
        self.assertTrue(stream.getvalue().endswith("\n"))

    def test_worker_and_instance(self) -> None:
        stream, log = self.emit(worker_type="gateway", instance_id="pod-1")
        log.warn("careful")
        log.error("bad")
        records = json_lines(stream.getvalue())
        self.assertEqual([r["level"] for r in records], ["warn", "error"])
        for record in records:
            self.assertEqual((record["worker_type"], record["instance_id"]), ("gateway", "pod-1"))

    def test_levels(self) -> None:
        stream, log = self.emit()
        for level in LogLevel.iterconstants():
            log.emit(level, "x")
        self.assertEqual(
            [r["level"] for r in json_lines(stream.getvalue())],
            ["debug", "info", "warn", "error", "critical"],
        )

    def test_non_scalars_dropped_reserved_renamed_nan_stringified(self) -> None:
        stream, log = self.emit(worker_type="w")
        log.info("x", items=[1, 2], obj=object(), raw=b"bytes", msg="mine", ts=1, ns="n",
                 worker_type="other", ratio=float("nan"), big=2**70)
        (record,) = json_lines(stream.getvalue())
        for dropped in ("items", "obj", "raw"):
            self.assertNotIn(dropped, record)
        self.assertEqual(record["msg"], "x")
        self.assertEqual((record["msg_"], record["ts_"], record["ns_"]), ("mine", 1, "n"))
        self.assertEqual((record["worker_type"], record["worker_type_"]), ("w", "other"))
        self.assertEqual(record["ratio"], "nan")
        self.assertEqual(record["big"], 2**70)

    def test_failure_as_exc(self) -> None:
        stream, log = self.emit()
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.failure("it broke {where}", where="here")
        (record,) = json_lines(stream.getvalue())
        self.assertEqual(record["level"], "critical")
        self.assertEqual(record["msg"], "it broke here")
        self.assertIn("ZeroDivisionError", record["exc"])
        self.assertIn("Traceback", record["exc"])

    def test_newlines_and_lone_surrogates_stay_on_one_line(self) -> None:
        stream, log = self.emit()
        log.info("a\nb {x}", x="\ud800\u2028|")
        text = stream.getvalue()
        self.assertEqual(len(text.splitlines()), 1)
        text.encode("utf-8")  # writable to any UTF-8 stream
        (record,) = json_lines(text)
        self.assertEqual(record["x"], "\ud800\u2028|")

    def test_unformattable_event_still_one_record(self) -> None:
        stream, log = self.emit()
        log.info("{missing}")
        (record,) = json_lines(stream.getvalue())
        self.assertIn("Unable to format event", record["msg"])

    def test_legacy_event(self) -> None:
        event: LogEvent = {
            "message": ("Site starting on 8000",), "isError": 0, "system": "-",
            "time": T0, "log_time": T0, "log_format": "{log_text}",
            "log_text": "Site starting on 8000", "log_namespace": "log_legacy",
            "log_level": LogLevel.info,
        }
        record = json.loads(format_json_event(event))
        self.assertEqual(
            record,
            {"ts": "2026-05-28T20:26:40.250Z", "level": "info", "msg": "Site starting on 8000",
             "ns": "log_legacy"},
        )

    def test_stdout_redirection_is_never_the_target(self) -> None:
        from twisted.logger import LoggingFile

        redirected = LoggingFile(Logger(observer=lambda e: None))
        observer = JSONLogObserver(redirected)  # type: ignore[arg-type]
        self.assertIsNot(observer.stream, redirected)

    def test_provides_ilogobserver(self) -> None:
        self.assertTrue(ILogObserver.providedBy(JSONLogObserver(io.StringIO())))
        self.assertTrue(ILogObserver.providedBy(logs.text_log_observer(io.StringIO())))


class TextObserverTests(SynchronousTestCase):
    def test_line(self) -> None:
        stream = io.StringIO()
        log = Logger(namespace="ns.x", observer=logs.text_log_observer(stream, "gw", "i1"))
        log.info("hello {who}", who="you")
        self.assertRegex(stream.getvalue(), rf"^{TS.pattern} \[ns\.x#info\] \[gw@i1\] hello you\n$")

    def test_without_tag_and_with_traceback(self) -> None:
        event: LogEvent = {
            "log_format": "oops", "log_time": T0, "log_namespace": "n",
            "log_level": LogLevel.error, "log_failure": Failure(ValueError("v")),
        }
        text = format_text_event(event)
        self.assertTrue(text.startswith("2026-05-28T20:26:40.250Z [n#error] oops\n\t"))
        self.assertIn("ValueError", text)
        self.assertTrue(all(line.startswith("\t") for line in text.splitlines()[1:]))
        self.assertEqual(format_text_event({"log_format": None}), "")

    def test_worker_tag(self) -> None:
        self.assertEqual(logs.worker_tag("a", "b"), "a@b")
        self.assertEqual(logs.worker_tag(None, "b"), "b")
        self.assertEqual(logs.worker_tag("a", None), "a")
        self.assertEqual(logs.worker_tag(None, None), "")


class FormatHelpersTests(SynchronousTestCase):
    def test_iso_timestamp(self) -> None:
        self.assertEqual(iso_timestamp(T0), "2026-05-28T20:26:40.250Z")
        self.assertEqual(iso_timestamp(0), "1970-01-01T00:00:00.000Z")
        self.assertEqual(iso_timestamp(float("inf")), "1970-01-01T00:00:00.000Z")
        self.assertEqual(iso_timestamp(T0 + 0.7499996), "2026-05-28T20:26:41.000Z")
        self.assertEqual(iso_timestamp(1e300), "1970-01-01T00:00:00.000Z")

    def test_iso_timestamp_every_millisecond(self) -> None:
        for ms in range(1000):
            self.assertEqual(iso_timestamp(1_780_000_000 + ms / 1000 + 0.0004),
                             f"2026-05-28T20:26:40.{ms:03d}Z")

    @given(st.lists(st.one_of(
        st.floats(1_780_000_000.0, 1_780_000_003.0),
        st.floats(-1e10, 1e11),
        st.sampled_from((0.0, -0.0, 0.9999995, 0.99999949999, 1_780_000_000.9999995,
                         float("nan"), float("inf"), -float("inf"), 1e300)),
    ), min_size=1, max_size=20))
    def test_iso_timestamp_as_datetime_whatever_came_before(self, moments: list[float]) -> None:
        """The last second remembered never changes a timestamp: each is datetime's own."""
        for seconds in moments:
            try:
                moment = datetime.fromtimestamp(seconds, UTC)
                expected = (moment.strftime("%Y-%m-%dT%H:%M:%S")
                            + f".{moment.microsecond // 1000:03d}Z")
            except (OverflowError, OSError, ValueError):
                expected = "1970-01-01T00:00:00.000Z"
            self.assertEqual(iso_timestamp(seconds), expected, seconds)

    def test_parse_log_format(self) -> None:
        self.assertEqual(parse_log_format(" JSON "), "json")
        self.assertEqual(parse_log_format("text"), "text")
        self.assertRaises(ValueError, parse_log_format, "yaml")


class InstallTests(SynchronousTestCase):
    def test_application_gets_the_component(self) -> None:
        application = Application("t")
        observer = JSONLogObserver(io.StringIO())
        self.assertTrue(install_observer(application, observer))
        self.assertIs(application.getComponent(ILogObserver, None), observer)

    def test_other_parents_left_alone(self) -> None:
        self.assertFalse(install_observer(MultiService(), JSONLogObserver(io.StringIO())))

    def test_observer_for_twistd_options(self) -> None:
        self.assertIsNone(observer_for_twistd("json", {"logger": "x.y", "nodaemon": True}))
        self.assertIsNone(observer_for_twistd("json", {"syslog": True, "nodaemon": True}))
        out = observer_for_twistd("json", {"nodaemon": True, "logfile": ""}, min_level="debug")
        self.assertIsInstance(out, JSONLogObserver)
        self.assertIsInstance(observer_for_twistd("json", {"logfile": "-"}, min_level="debug"),
                              JSONLogObserver)
        self.assertIsNotNone(observer_for_twistd("text", None))

    def test_log_level_filters(self) -> None:
        """LOG_LEVEL=info (the default) keeps debug events, e.g. llama-server's per-request
        lines, out of the log; LOG_LEVEL=debug lets them through."""
        path = os.path.abspath(self.mktemp())
        observer = observer_for_twistd("json", {"nodaemon": True, "logfile": path})
        assert observer is not None
        Logger(observer=observer).debug("hidden")
        Logger(observer=observer).info("shown")
        self.assertEqual([r["msg"] for r in json_lines(Path(path).read_text())], ["shown"])
        path = os.path.abspath(self.mktemp())
        observer = observer_for_twistd("json", {"nodaemon": True, "logfile": path},
                                       min_level="debug")
        assert observer is not None
        Logger(observer=observer).debug("now shown")
        self.assertEqual([r["msg"] for r in json_lines(Path(path).read_text())], ["now shown"])

    def test_factory_chatter_is_quiet(self) -> None:
        """The stock path's connection pool starts and stops a client factory per connection:
        Twisted's "Starting factory" / "Stopping factory" notes stay out of an info log (found
        when the e2e suite ran with FAST_PATHS=off: 10 000 bad keys grew the log by 13 lines)."""
        from twisted.internet.protocol import ClientFactory

        path = os.path.abspath(self.mktemp())
        observer = observer_for_twistd("json", {"nodaemon": True, "logfile": path})
        assert observer is not None
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(observer)
        try:
            factory = ClientFactory()
            factory.noisy = True
            factory.doStart()
            factory.doStop()
            Logger().info("kept")
        finally:
            globalLogPublisher.removeObserver(observer)
        self.assertEqual([r["msg"] for r in json_lines(Path(path).read_text())], ["kept"])

    def test_observer_for_twistd_logfile(self) -> None:
        path = os.path.abspath(self.mktemp())
        observer = observer_for_twistd("json", {"nodaemon": True, "logfile": path}, "w", "i")
        assert observer is not None
        Logger(observer=observer).info("to the file")
        (record,) = json_lines(Path(path).read_text())
        self.assertEqual((record["msg"], record["worker_type"]), ("to the file", "w"))

    def test_json_observer_factory_reads_the_environment(self) -> None:
        self.patch(os, "environ", {"WORKER_TYPE": "llama", "INSTANCE_ID": "a b/c"})
        observer = logs.json_observer_factory()
        assert isinstance(observer, JSONLogObserver)
        self.assertEqual((observer.worker_type, observer.instance_id), ("llama", "a_b_c"))
        self.assertTrue(ILogObserver.providedBy(logs.text_observer_factory()))


PLUGIN = """
from twisted.application.service import ServiceMaker
logstest = ServiceMaker("logstest", "logstest_tap", "logs test", "logstest")
"""

TAP = """
from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.python import usage
from llamaproxy.observability import logs

log = Logger()


class Options(usage.Options):
    optParameters = [["format", None, "json", ""]]


class Root(MultiService):
    def __init__(self, observer):
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent):
        if self.observer is not None:
            logs.install_observer(parent, self.observer)
        super().setServiceParent(parent)

    def startService(self):
        super().startService()
        from twisted.internet import reactor
        log.info("started {n}", n=7)
        print("a print")
        reactor.callLater(0, reactor.stop)


def makeService(options):
    log.info("made {x}", x="early")
    return Root(logs.observer_for_twistd(options["format"], options.parent, "gw", "i1"))
"""


class TwistdTests(SynchronousTestCase):
    """The real twistd, with a throwaway plugin whose root service installs the observer."""

    def setUp(self) -> None:
        self.root = Path(os.path.abspath(self.mktemp()))
        (self.root / "twisted" / "plugins").mkdir(parents=True)
        (self.root / "twisted" / "plugins" / "logstest_plugin.py").write_text(PLUGIN)
        (self.root / "logstest_tap.py").write_text(textwrap.dedent(TAP))

    def twistd(self, *argv: str) -> str:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(self.root), *sys.path]))
        result = subprocess.run(
            [twistd_script(), "-n", "--pidfile=", *argv], cwd=self.root, env=env,
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
        return result.stdout

    def test_installed_json_observer(self) -> None:
        records = json_lines(self.twistd("logstest"))
        messages = [r["msg"] for r in records]
        self.assertIn("made early", messages)  # logged in makeService, before logging began
        self.assertIn("started 7", messages)
        self.assertIn("a print", messages)
        self.assertTrue(any(m.startswith("twistd ") for m in messages))
        for record in records:
            self.assertEqual((record["worker_type"], record["instance_id"]), ("gw", "i1"))

    def test_installed_text_observer(self) -> None:
        out = self.twistd("logstest", "--format", "text")
        self.assertIn("[gw@i1] started 7", out)

    def test_logfile_is_honoured(self) -> None:
        self.assertEqual(self.twistd("--logfile", "out.log", "logstest"), "")
        messages = [r["msg"] for r in json_lines((self.root / "out.log").read_text())]
        self.assertIn("started 7", messages)

    def test_logger_option(self) -> None:
        out = self.twistd("--logger",
                          "llamaproxy.observability.logs.json_observer_factory", "logstest",
                          "--format", "text")
        self.assertIn("started 7", [r["msg"] for r in json_lines(out)])


class AccessFormatTests(SynchronousTestCase):
    def test_text_line(self) -> None:
        self.assertEqual(
            format_access_text(entry(client="203.0.113.9")),
            "2026-05-28T20:26:40.250Z | abc123 | alice | POST /v1/chat/completions | 200 | "
            "1234.6ms | ttfb=210.0ms | bytes=5120 | model=qwen | tokens=12/345 | ok | "
            "client=203.0.113.9\n",
        )

    def test_text_missing_values_and_tag(self) -> None:
        line = format_access_text(
            entry(key_id=None, ttfb_ms=None, model=None, prompt_tokens=None,
                  completion_tokens=None, status=401, outcome="rejected"),
            "gw", "i1",
        )
        self.assertEqual(
            line,
            "2026-05-28T20:26:40.250Z | abc123 | - | POST /v1/chat/completions | 401 | "
            "1234.6ms | ttfb=- | bytes=5120 | model=- | tokens=-/- | rejected | client=- | "
            "gw@i1\n",
        )

    def test_text_sanitised(self) -> None:
        line = format_access_text(entry(key_id="a|b\tc", path="/x\r\ny|z\x00\u2028\u202e"))
        self.assertIn(" | a_b_c | POST /x__y_z___ | ", line)

    def test_json_line(self) -> None:
        record = json.loads(format_access_json(entry(key_id=None, path="/a\nb|"), "gw", "i1"))
        self.assertEqual(
            record,
            {"ts": "2026-05-28T20:26:40.250Z", "request_id": "abc123", "key_id": None,
             "method": "POST", "path": "/a\nb|", "status": 200, "duration_ms": 1234.6,
             "ttfb_ms": 210.0, "bytes": 5120, "model": "qwen", "prompt_tokens": 12,
             "completion_tokens": 345, "outcome": "ok", "client": None, "worker_type": "gw",
             "instance_id": "i1"},
        )

    def test_long_fields_cut(self) -> None:
        self.assertEqual(len(sanitize_field("x" * 10_000)), access_log.MAX_FIELD_LENGTH)
        self.assertEqual(sanitize_field(""), "-")
        self.assertEqual(sanitize_field(None), "-")

    @given(
        st.text(), st.text(), st.one_of(st.none(), st.text()), st.text(),
        st.one_of(st.none(), st.text()), st.text(),
    )
    def test_text_never_splits(
        self, request_id: str, method: str, key_id: str | None, path: str,
        model: str | None, outcome: str,
    ) -> None:
        line = format_access_text(
            entry(request_id=request_id, method=method, key_id=key_id, path=path, model=model,
                  outcome=outcome),
            "w|x", "i\nj",
        )
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(len(line.splitlines()), 1)
        self.assertEqual(len(line.rstrip("\n").split("|")), 13)
        line.encode("utf-8")

    @given(st.text(), st.one_of(st.none(), st.text(max_size=100)))
    def test_json_always_one_parseable_line(self, path: str, key_id: str | None) -> None:
        line = format_access_json(entry(path=path, key_id=key_id))
        self.assertEqual(len(line.splitlines()), 1)
        line.encode("utf-8")
        record = json.loads(line)
        self.assertEqual((record["path"], record["key_id"]), (path, key_id))


    @given(st.one_of(st.floats(), st.floats(min_value=-2e14, max_value=2e14),
                     st.integers(min_value=-10**16, max_value=10**16).map(lambda n: n / 20)))
    def test_json_durations_are_the_json_encoder_output(self, duration: float) -> None:
        """Durations below 1e14 ms are written with ``:.1f`` instead of ``repr(round())``."""
        record = entry(duration_ms=duration, ttfb_ms=-duration)
        self.assertEqual(
            format_access_json(record),
            logs.dumps_compact(access_log.access_record(record)) + "\n",
        )

    @given(
        st.text(max_size=40), st.one_of(st.none(), st.text(max_size=40)), st.text(max_size=300),
        st.floats(allow_nan=True, allow_infinity=True),
        st.one_of(st.none(), st.floats(min_value=0, max_value=1e6)),
        st.one_of(st.none(), st.integers(min_value=0, max_value=10**9), st.just(1.5)),
        st.one_of(st.none(), st.text(max_size=20)), st.one_of(st.none(), st.text(max_size=20)),
    )
    def test_json_by_hand_is_the_json_encoder_output(
        self, request_id: str, key_id: str | None, path: str, duration: float,
        ttfb: float | None, tokens: int | float | None, worker: str | None, instance: str | None,
    ) -> None:
        record = entry(request_id=request_id, key_id=key_id, path=path, duration_ms=duration,
                       ttfb_ms=ttfb, prompt_tokens=tokens, model=key_id, outcome=request_id)
        self.assertEqual(
            format_access_json(record, worker, instance),
            logs.dumps_compact(access_log.access_record(record, worker, instance)) + "\n",
        )


    def test_remembered_fragments_write_what_the_encoder_does(self) -> None:
        """``_json_line`` remembers its head and tail fragments: the same lines when they are
        remembered, when other values replace them and after the memo starts over."""
        access_log._HEAD_FRAGMENTS.clear()
        access_log._TAIL_FRAGMENTS.clear()
        records = [
            entry(key_id=key_id, path=path, status=status, outcome=outcome, client=client,
                  route=route, request_id=f"r{n}", duration_ms=n / 7)
            for n, (key_id, path, status, outcome, client, route) in enumerate([
                ("alice", "/v1/chat/completions", 200, "complete", "10.0.0.1", None),
                (None, "/v1/models", 401, "rejected", "10.0.0.2", "affinity_hit"),
                ("bob", "/a\"b\u00e9", 503, "o\n", None, ""),
            ])
        ]
        for _ in range(2):  # written, then remembered
            for record in records:
                for worker, instance in ((None, None), ("w", "i1")):
                    self.assertEqual(
                        format_access_json(record, worker, instance),
                        logs.dumps_compact(access_log.access_record(record, worker, instance))
                        + "\n")
        for n in range(2 * access_log._FRAGMENTS_KEPT + 1):  # over the bound: starts over
            record = entry(path=f"/p{n}", client=f"c{n}")
            self.assertEqual(format_access_json(record),
                             logs.dumps_compact(access_log.access_record(record)) + "\n")
        self.assertLessEqual(len(access_log._HEAD_FRAGMENTS), access_log._FRAGMENTS_KEPT)
        self.assertLessEqual(len(access_log._TAIL_FRAGMENTS), access_log._FRAGMENTS_KEPT)

    def test_json_by_hand_cuts_long_fields_as_the_record_does(self) -> None:
        limit = access_log.MAX_FIELD_LENGTH
        for size in (limit - 1, limit, limit + 1, 3 * limit):
            record = entry(request_id="r" * size, key_id="\u00e9" * size, path="/" * size,
                           model="m\n" * size, outcome="o" * size, client="c" * size)
            line = format_access_json(record)
            self.assertEqual(line, logs.dumps_compact(access_log.access_record(record)) + "\n")
            self.assertEqual(json.loads(line)["path"], "/" * min(size, limit)
                             if size <= limit else "/" * (limit - 3) + "...")


class AccessFieldsTests(SynchronousTestCase):
    """``AccessLog.record_fields``: the recorder's way to log a request without building its
    ``AccessEntry``; the same bytes as ``record`` of the entry."""

    def test_the_fields_are_the_entry_in_field_order(self) -> None:
        record = entry(tokens_estimated=True, client="10.0.0.1", route="affinity_hit")
        names = [field.name for field in dataclasses.fields(AccessEntry)]
        self.assertEqual(list(access_log.access_fields(record)),
                         [getattr(record, name) for name in names])
        self.assertEqual(AccessEntry(*access_log.access_fields(record)), record)

    @given(
        st.sampled_from(["text", "json"]), st.text(max_size=40),
        st.one_of(st.none(), st.text(max_size=40)), st.text(max_size=300),
        st.floats(allow_nan=True, allow_infinity=True),
        st.one_of(st.none(), st.floats(min_value=0, max_value=1e6)),
        st.one_of(st.none(), st.integers(min_value=0, max_value=10**9), st.just(1.5)),
        st.booleans(), st.one_of(st.none(), st.text(max_size=20)),
        st.one_of(st.none(), st.text(max_size=20)),
    )
    def test_record_fields_writes_what_record_writes(
        self, fmt: logs.LogFormat, request_id: str, key_id: str | None, path: str,
        duration: float, ttfb: float | None, tokens: int | float | None, estimated: bool,
        route: str | None, instance: str | None,
    ) -> None:
        record = entry(request_id=request_id, key_id=key_id, path=path, duration_ms=duration,
                       ttfb_ms=ttfb, prompt_tokens=tokens, model=key_id, outcome=request_id,
                       tokens_estimated=estimated, client=route, route=route)
        written: list[bytes] = []
        access = AccessLog("unused", fmt, Clock(), instance_id=instance, worker_type="w")
        access._write = written.append  # type: ignore[method-assign]
        access.record_fields(access_log.access_fields(record))
        access.flush()
        self.assertEqual(written, [access.format(record).encode("utf-8", "backslashreplace")])


class AccessLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.directory = Path(os.path.abspath(self.mktemp()))
        self.path = self.directory / "logs" / "api_access.log"
        self.events: list[LogEvent] = []
        self.patch(access_log, "log", Logger(observer=self.events.append))

    def make(self, fmt: logs.LogFormat = "text", **kwargs: Any) -> AccessLog:
        access = AccessLog(str(self.path), fmt, self.clock, **kwargs)
        self.addCleanup(access.close)
        return access

    def content(self) -> str:
        return self.path.read_text() if self.path.exists() else ""

    def test_buffered_until_the_timer(self) -> None:
        access = self.make()
        access.record(entry())
        access.record(entry(request_id="second"))
        self.assertEqual(self.content(), "")
        self.clock.advance(0.49)
        self.assertEqual(self.content(), "")
        self.clock.advance(0.01)
        lines = self.content().splitlines()
        self.assertEqual([line.split(" | ")[1] for line in lines], ["abc123", "second"])
        self.assertFalse(self.clock.getDelayedCalls())

    def test_directory_and_mode(self) -> None:
        access = self.make()
        access.record(entry())
        access.flush()
        umask = os.umask(0)
        os.umask(umask)
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o640 & ~umask)

    def test_big_buffer_written_at_once(self) -> None:
        access = self.make(max_buffer=1000)
        for _ in range(10):
            access.record(entry())
        self.assertGreater(len(self.content()), 1000)
        self.assertLess(len(self.content().splitlines()), 10)

    def test_json_mode(self) -> None:
        access = self.make("json", instance_id="i", worker_type="w")
        access.record(entry(status=429, key_id="bob"))
        access.close()
        (record,) = json_lines(self.content())
        self.assertEqual((record["status"], record["key_id"], record["instance_id"]),
                         (429, "bob", "i"))

    def test_close_flushes_and_stops_recording(self) -> None:
        access = self.make()
        access.record(entry())
        access.close()
        self.assertEqual(len(self.content().splitlines()), 1)
        access.record(entry())
        self.clock.advance(1)
        self.assertEqual(len(self.content().splitlines()), 1)
        self.assertFalse(self.clock.getDelayedCalls())

    def test_reopen_after_rename(self) -> None:
        access = self.make()
        access.record(entry(request_id="one"))
        self.clock.advance(1)
        rotated = self.path.with_name("api_access.log.1")
        os.rename(self.path, rotated)
        access.record(entry(request_id="two"))
        access.reopen()  # logrotate's postrotate SIGHUP
        access.record(entry(request_id="three"))
        access.flush()
        self.assertEqual([line.split(" | ")[1] for line in rotated.read_text().splitlines()],
                         ["one", "two"])
        self.assertEqual([line.split(" | ")[1] for line in self.content().splitlines()],
                         ["three"])

    def test_copytruncate_keeps_appending(self) -> None:
        access = self.make()
        access.record(entry(request_id="one"))
        access.flush()
        with open(self.path, "r+") as f:
            f.truncate(0)
        access.record(entry(request_id="two"))
        access.flush()
        self.assertEqual(self.content().split(" | ")[1], "two")  # O_APPEND: no hole, no NULs

    def test_write_errors_logged_once_then_recovery(self) -> None:
        self.directory.mkdir(parents=True)
        (self.directory / "logs").write_text("not a directory")
        access = self.make()
        for _ in range(3):
            access.record(entry())
            self.clock.advance(1)
        errors = [e for e in self.events if e["log_level"] is LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertIn("Cannot write the access log", errors[0]["log_format"])
        (self.directory / "logs").unlink()
        access.record(entry(request_id="back"))
        self.clock.advance(1)
        self.assertEqual(self.content().split(" | ")[1], "back")
        self.assertEqual(self.events[-1]["dropped"], 3)

    def test_disabled(self) -> None:
        access = AccessLog(None, "text", self.clock)
        self.assertFalse(access.enabled)
        access.record(entry())
        access.close()
        self.assertFalse(self.clock.getDelayedCalls())

    def test_bad_format(self) -> None:
        self.assertRaises(ValueError, AccessLog, "x", "xml", self.clock)  # type: ignore[arg-type]

    def test_default_path(self) -> None:
        self.assertEqual(access_log.default_access_log_path("/data"), "/data/logs/api_access.log")


class RequestIdTests(SynchronousTestCase):
    def test_valid_ids_kept(self) -> None:
        for value in (b"abc", b"A-b_c.d:e", b"x" * 128, b"0"):
            self.assertEqual(request_id_from(value), value.decode())

    def test_invalid_ids_replaced(self) -> None:
        for value in (None, b"", b"x" * 129, b"a b", b"a|b", b"a\nb", "\u00e9".encode(),
                      b"\xff", b"a/b"):
            generated = request_id_from(value)
            self.assertRegex(generated, r"^[0-9a-f]{16}$")

    def test_generated_ids_unique(self) -> None:
        self.assertEqual(len({request_id_from(None) for _ in range(1000)}), 1000)

    def test_no_header_gives_new_request_id(self) -> None:
        """``request_id_from`` makes the id itself when there is no header: ``new_request_id``'s,
        from the module ``random``'s generator."""
        state = random.getstate()
        self.addCleanup(random.setstate, state)
        for value in (None, b""):
            random.seed(7)
            made = [request_id_from(value) for _ in range(5)]
            random.seed(7)
            self.assertEqual(made, [access_log.new_request_id() for _ in range(5)])

    @given(st.binary(max_size=200))
    def test_always_safe(self, value: bytes) -> None:
        self.assertRegex(request_id_from(value), r"^[A-Za-z0-9._:-]{1,128}$")


class ResolveTests(SynchronousTestCase):
    def test_resolve_access_log(self) -> None:
        self.assertEqual(access_log.resolve_access_log(None, "/d"), "/d/logs/api_access.log")
        self.assertEqual(access_log.resolve_access_log(" ", "/d"), "/d/logs/api_access.log")
        self.assertIsNone(access_log.resolve_access_log("OFF", "/d"))
        self.assertEqual(access_log.resolve_access_log("-", "/d"), "-")
        self.assertEqual(access_log.resolve_access_log("/var/log/a.log", "/d"), "/var/log/a.log")
