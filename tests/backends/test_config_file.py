"""Tests for llamaproxy.backends.config_file: the TOML file, its errors, the single-backend
table."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llamaproxy.backends import config_file as backends_file
from llamaproxy.backends.breaker import BreakerSettings
from llamaproxy.backends.config_file import (
    DEFAULT_SWAP_BATCH,
    DEFAULT_SWAP_GRACE,
    BackendsFileError,
    BackendsTable,
    GroupSpec,
    LocalBackendSpec,
    LocalDefaults,
    ModelSpec,
    RemoteBackendSpec,
    Start,
    Strategy,
    Timeouts,
    diff,
    load_backends_file,
    needs_restart,
    parse_backends_text,
    single_backend_table,
    upstream_url,
    upstream_url_bytes,
)
from llamaproxy.config import Config, ConfigError, load_config
from llamaproxy.supervision.llama_server import build_args

EXAMPLE = """
[[backends]]
name = "local-a"
model_path = "/models/a.gguf"        # a supervised llama-server child
models = ["a", "alias-a"]
priority = 1

[[backends]]
name = "remote"
base_url = "http://127.0.0.1:9000/v1" # an OpenAI-compatible upstream
api_key_env = "REMOTE_KEY"
models = ["a", "b"]
priority = 2
"""

DOCS = Path(__file__).resolve().parent.parent.parent / "docs" / "routing.md"

LOCAL = '[[backends]]\nmodel_path = "/m/a.gguf"\nmodels = ["a"]\n'
REMOTE = '[[backends]]\nbase_url = "http://up:9000/v1"\nmodels = ["r"]\n'
ENV = {"REMOTE_KEY": "sk-remote-secret"}


def parse(
    text: str,
    environ: dict[str, str] | None = None,
    defaults: LocalDefaults | None = None,
    is_file: Callable[[str], bool] = lambda path: True,
) -> BackendsTable:
    """Parse ``text`` as backends.toml (every model file exists unless ``is_file`` says)."""
    return parse_backends_text(
        text, "backends.toml", ENV if environ is None else environ, defaults=defaults,
        is_file=is_file,
    )


def env_config(**env: str) -> Config:
    """A Config from environment variables only."""
    return load_config({}, env, path_exists=lambda p: False, hostname=lambda: "host")


class ExampleTests(SynchronousTestCase):
    def test_issue_example_parses(self) -> None:
        table = parse(EXAMPLE)
        local, remote = table.backends
        assert isinstance(local, LocalBackendSpec) and isinstance(remote, RemoteBackendSpec)
        self.assertEqual((local.name, local.models, local.priority, local.weight),
                         ("local-a", ("a", "alias-a"), 1, 1))
        self.assertEqual(local.model_path, "/models/a.gguf")
        self.assertEqual(local.port, 8080)  # auto-assigned from the base
        self.assertEqual(local.base_url, "http://127.0.0.1:8080")
        self.assertEqual((local.ctx, local.ngl, local.threads, local.parallel), (16384, 99, 0, 0))
        self.assertEqual(local.canonical_model, "a")
        self.assertIsNone(local.api_key)
        self.assertEqual((remote.name, remote.models, remote.priority), ("remote", ("a", "b"), 2))
        self.assertEqual(remote.base_url, "http://127.0.0.1:9000/v1")
        self.assertEqual(remote.api_key, "sk-remote-secret")
        self.assertEqual(remote.api_key_env, "REMOTE_KEY")
        self.assertTrue(remote.verify_tls)
        self.assertNotIn("sk-remote-secret", repr(remote))
        self.assertEqual([m.name for m in table.models], ["a", "alias-a", "b"])
        self.assertEqual({m.strategy for m in table.models}, {Strategy.PRIORITY})
        self.assertEqual(table.default_model, "a")
        self.assertEqual(table.breaker, BreakerSettings())
        self.assertEqual(local.breaker, BreakerSettings(5, 60.0, 2, 1))
        self.assertEqual(table.failover.max_attempts, 3)
        self.assertEqual(table.key_models, {})
        self.assertEqual(table.source, "backends.toml")
        self.assertFalse(table.route_unknown_models)
        self.assertEqual(table.backends_for("a"), (local, remote))
        self.assertEqual(table.backends_for("b"), (remote,))
        self.assertEqual(table.backend("remote"), remote)
        self.assertRaises(KeyError, table.backend, "nope")
        self.assertRaises(KeyError, table.model, "nope")

    def test_documented_example(self) -> None:
        text = DOCS.read_text()
        example = text.split("```toml\n", 1)[1].split("```", 1)[0]
        table = parse(example, {"FALLBACK_API_KEY": "sk-fallback"})
        self.assertEqual(table.backend_names, ("qwen-local", "smol-local", "fallback"))
        self.assertEqual([s.port for s in table.backends if isinstance(s, LocalBackendSpec)],
                         [8080, 8090])
        self.assertEqual(table.default_model, "qwen2.5-7b")
        self.assertEqual(table.lookup("gpt-4o-mini"), "qwen2.5-7b")
        self.assertEqual(table.model("smollm2").strategy, Strategy.LEAST_BUSY)
        self.assertEqual(table.key_models, {"intern": frozenset({"smol"})})
        fallback = table.backend("fallback")
        self.assertEqual(fallback.upstream_model("qwen2.5-7b"), "Qwen/Qwen2.5-7B-Instruct")
        self.assertEqual(fallback.breaker, BreakerSettings(3, 30.0, 2, 1))

    def test_every_key_is_documented(self) -> None:
        text = DOCS.read_text()
        for table in backends_file._TOP_KEYS:
            self.assertIn(f"`[{table}", text.replace("`[[", "`["))
        keys = (backends_file._COMMON_KEYS + backends_file._LOCAL_KEYS
                + backends_file._REMOTE_KEYS + backends_file._BREAKER_KEYS
                + backends_file._MODEL_KEYS + backends_file._LOCAL_DEFAULT_KEYS + ("max_attempts",)
                + backends_file._GROUP_KEYS)
        for key in keys:
            self.assertIn(f"`{key}`", text)
        for strategy in Strategy:
            self.assertIn(f"`{strategy.value}`", text)

    def test_every_key(self) -> None:
        table = parse("""
            [local]
            port_base = 9100
            ctx = 4096
            ngl = 0
            threads = 4
            parallel = 2

            [breaker]
            failure_threshold = 3
            reset_timeout = 30
            success_threshold = 1
            half_open_max = 2
            enabled = true

            [failover]
            max_attempts = 2

            [[backends]]
            name = "small"
            model_path = "/m/small.gguf"
            models = ["small", "tiny"]
            port = 9100
            ctx = 8192
            ngl = 10
            threads = 8
            parallel = 4
            extra_args = ["--flash-attn", "on"]
            slots = 3
            priority = 1
            weight = 2
            connect_timeout = 1.5
            first_byte_timeout = 20
            request_timeout = 600
            breaker = { failure_threshold = 7 }

            [[backends]]
            model_path = "/m/big.gguf"
            models = ["big"]

            [[backends]]
            name = "cloud"
            base_url = "https://api.example.com/v1/"
            api_key_env = "REMOTE_KEY"
            verify_tls = false
            models = ["small", "big"]
            priority = 9
            upstream_models = { small = "vendor/small-instruct" }

            [backends.breaker]
            reset_timeout = 120

            [models.small]
            strategy = "round-robin"
            aliases = ["s", "gpt-3.5-turbo"]
            default = true

            [models.big]
            strategy = "least-busy"

            [keys.alice]
            models = ["s", "big"]

            [keys.bob]
            models = []
        """)
        small, big, cloud = table.backends
        assert isinstance(small, LocalBackendSpec) and isinstance(big, LocalBackendSpec)
        assert isinstance(cloud, RemoteBackendSpec)
        self.assertEqual(small.port, 9100)
        self.assertEqual(big.port, 9101)  # the base is taken by an explicit port
        self.assertEqual((small.ctx, small.ngl, small.threads, small.parallel), (8192, 10, 8, 4))
        self.assertEqual((big.ctx, big.ngl, big.threads, big.parallel), (4096, 0, 4, 2))
        self.assertEqual(small.extra_args, ("--flash-attn", "on"))
        self.assertEqual((small.slots, small.max_concurrent, big.max_concurrent), (3, 3, 2))
        self.assertEqual((small.known_slots, cloud.known_slots, cloud.max_concurrent),
                         (4, None, 4))
        self.assertEqual(small.timeouts, Timeouts(1.5, 20.0, 600.0))
        self.assertEqual(big.timeouts, Timeouts())
        self.assertEqual(small.breaker, BreakerSettings(7, 30.0, 1, 2))
        self.assertEqual(big.breaker, BreakerSettings(3, 30.0, 1, 2))
        self.assertEqual(cloud.breaker, BreakerSettings(3, 120.0, 1, 2))
        self.assertEqual(big.name, "big")  # defaults to the first model
        self.assertEqual((small.priority, small.weight, big.priority, big.weight), (1, 2, 0, 1))
        self.assertEqual(cloud.base_url, "https://api.example.com/v1")
        self.assertFalse(cloud.verify_tls)
        self.assertEqual(cloud.upstream_model("small"), "vendor/small-instruct")
        self.assertEqual(cloud.upstream_model("big"), "big")
        self.assertEqual(table.failover.max_attempts, 2)
        self.assertEqual(table.models, (
            ModelSpec("small", Strategy.ROUND_ROBIN, ("s", "gpt-3.5-turbo"), True),
            ModelSpec("tiny"),
            ModelSpec("big", Strategy.LEAST_BUSY),
        ))
        self.assertEqual(table.default_model, "small")
        self.assertEqual(table.key_models, {"alice": frozenset({"small", "big"}),
                                            "bob": frozenset()})
        self.assertEqual(table.lookup("gpt-3.5-turbo"), "small")
        self.assertEqual(table.lookup("tiny"), "tiny")
        self.assertIsNone(table.lookup("nope"))

    def test_ports_skip_reserved_and_explicit(self) -> None:
        text = LOCAL + LOCAL.replace('"a"', '"b"') + LOCAL.replace('"a"]', '"c"]\nport = 8002')
        defaults = LocalDefaults(port_base=8000, reserved_ports=frozenset({8001}))
        table = parse(text, defaults=defaults)
        ports = [s.port for s in table.backends if isinstance(s, LocalBackendSpec)]
        self.assertEqual(ports, [8000, 8003, 8002])

    def test_local_defaults_from_config(self) -> None:
        config = env_config(BACKEND_URL="http://x", PORT_BACKEND="7000", CTX="1024", NGL="3",
                            THREADS="2", PARALLEL="5", PORT="8000", PORT_HEALTH="0")
        self.assertEqual(LocalDefaults.from_config(config),
                         LocalDefaults(7000, 1024, 3, 2, 5, frozenset({8000})))

    def test_relative_model_path_and_real_file(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "a.gguf").write_bytes(b"GGUF")
        path = directory / "backends.toml"
        path.write_text('[[backends]]\nmodel_path = "a.gguf"\nmodels = ["a"]\n')
        table = load_backends_file(str(path), {})
        self.assertEqual(table.backends[0].model_path,  # type: ignore[union-attr]
                         os.path.join(str(directory.resolve()), "a.gguf"))
        self.assertEqual(table.source, str(path))
        path.write_text('[[backends]]\nmodel_path = "b.gguf"\nmodels = ["a"]\n')
        error = self.assertRaises(BackendsFileError, load_backends_file, str(path), {})
        self.assertEqual(str(error), f"{path}: backends[0].model_path: model file not found: "
                                     f"{directory.resolve() / 'b.gguf'}")


class ValidationTests(SynchronousTestCase):
    """Every error names the file, the table and the key."""

    def assertError(self, text: str, where: str, fragment: str,
                    environ: dict[str, str] | None = None, **kw: object) -> None:
        error = self.assertRaises(BackendsFileError, parse, text, environ, **kw)
        self.assertIsInstance(error, ConfigError)
        message = str(error)
        self.assertTrue(message.startswith(f"backends.toml: {where}: "), message)
        self.assertIn(fragment, message)

    def test_file_level(self) -> None:
        missing = self.mktemp()
        error = self.assertRaises(BackendsFileError, load_backends_file, missing, {})
        self.assertTrue(str(error).startswith(f"{missing}: cannot read: "), str(error))
        error = self.assertRaises(BackendsFileError, parse, "[[backends]\n")
        self.assertTrue(str(error).startswith("backends.toml: not valid TOML: "), str(error))
        path = Path(self.mktemp())
        path.write_text("x = \n")
        error = self.assertRaises(BackendsFileError, load_backends_file, str(path), {})
        self.assertTrue(str(error).startswith(f"{path}: not valid TOML: "), str(error))

    def test_top_level(self) -> None:
        self.assertError("backend = 1\n" + LOCAL, "backend", "unknown key (expected one of: "
                         "backends, models, breaker, failover, keys, local, affinity, groups)")
        self.assertError("", "backends", "missing")
        self.assertError("backends = []\n", "backends", "non-empty array of tables")
        self.assertError("backends = 3\n", "backends", "non-empty array of tables")
        self.assertError("backends = [1]\n", "backends[0]", "expected a table, got an integer")
        self.assertError("failover = 1\n" + LOCAL, "failover", "expected a table")

    def test_backend_kind(self) -> None:
        self.assertError('[[backends]]\nmodels = ["a"]\n', "backends[0]",
                         "needs model_path (a local child) or base_url (a remote upstream)")
        self.assertError(LOCAL + 'base_url = "http://x"\n', "backends[0]", "has both")
        self.assertError(LOCAL + 'modle_path = "x"\n', "backends[0].modle_path", "unknown key")
        self.assertError(LOCAL + "verify_tls = true\n", "backends[0].verify_tls",
                         "only for remote backends (with base_url)")
        self.assertError(LOCAL + 'api_key_env = "K"\n', "backends[0].api_key_env",
                         "only for remote backends")
        for key, value in [("ctx", "1"), ("ngl", "1"), ("threads", "1"), ("parallel", "1"),
                           ("port", "1"), ("extra_args", "[]")]:
            self.assertError(REMOTE + f"{key} = {value}\n", f"backends[0].{key}",
                             "only for local backends (with model_path)")

    def test_names_and_models(self) -> None:
        self.assertError('[[backends]]\nmodel_path = "/m"\n', "backends[0].models", "missing")
        self.assertError('[[backends]]\nmodel_path = "/m"\nmodels = []\n', "backends[0].models",
                         "at least one")
        self.assertError('[[backends]]\nmodel_path = "/m"\nmodels = "a"\n', "backends[0].models",
                         "expected a list of strings, got a string")
        self.assertError('[[backends]]\nmodel_path = "/m"\nmodels = ["a", 1]\n',
                         "backends[0].models[1]", "expected a string, got an integer")
        self.assertError('[[backends]]\nmodel_path = "/m"\nmodels = ["a", "a"]\n',
                         "backends[0].models[1]", "listed twice")
        self.assertError('[[backends]]\nmodel_path = "/m"\nmodels = ["a b"]\n',
                         "backends[0].models[0]", "invalid model name")
        self.assertError('[[backends]]\nmodel_path = "/m"\nmodels = [""]\n',
                         "backends[0].models[0]", "invalid model name")
        self.assertError('[[backends]]\nmodel_path = "/m"\nmodels = ["org/m:q4"]\n',
                         "backends[0].name", "not a valid backend name: set name")
        self.assertError(LOCAL + 'name = "a b"\n', "backends[0].name", "invalid backend name")
        self.assertError(LOCAL + "name = 3\n", "backends[0].name", "expected a string")
        self.assertError(LOCAL + 'name = "  "\n', "backends[0].name", "must not be empty")
        self.assertError(LOCAL + REMOTE.replace('"r"', '"a"'), "backends[1].name",
                         "duplicate backend name 'a' (also backends[0])")
        # a model name that is not a valid backend name is fine with a name
        parse('[[backends]]\nname = "m"\nmodel_path = "/m"\nmodels = ["org/m:q4"]\n')

    def test_numbers(self) -> None:
        cases = [
            ("priority = true", "backends[0].priority", "expected an integer, got a boolean"),
            ("priority = 1.5", "backends[0].priority", "expected an integer, got a number"),
            ("priority = 1979-05-27", "backends[0].priority", "expected an integer, got date"),
            ("weight = 0", "backends[0].weight", "between 1 and 1000, got 0"),
            ("slots = 0", "backends[0].slots", ">= 1, got 0"),
            ("port = 0", "backends[0].port", "between 1 and 65535"),
            ("port = 70000", "backends[0].port", "between 1 and 65535"),
            ("port = '8080'", "backends[0].port", "expected an integer, got a string"),
            ("ctx = -1", "backends[0].ctx", ">= 0"),
            ("ngl = -1", "backends[0].ngl", ">= 0"),
            ("threads = -1", "backends[0].threads", ">= 0"),
            ("parallel = -1", "backends[0].parallel", ">= 0"),
            ("connect_timeout = 0", "backends[0].connect_timeout", "> 0, got 0"),
            ("first_byte_timeout = -1.0", "backends[0].first_byte_timeout", "> 0"),
            ("request_timeout = nan", "backends[0].request_timeout", "> 0"),
            ("request_timeout = inf", "backends[0].request_timeout", "> 0"),
            ("request_timeout = '5'", "backends[0].request_timeout", "got a string"),
            ("extra_args = '--x'", "backends[0].extra_args", "expected a list of strings"),
            ("extra_args = [1]", "backends[0].extra_args[0]", "expected a string"),
            ("model_path = 5", "backends[0].model_path", "expected a string"),
        ]
        for line, where, fragment in cases:
            text = LOCAL + line + "\n" if not line.startswith("model_path") else (
                '[[backends]]\nmodels = ["a"]\n' + line + "\n")
            self.assertError(text, where, fragment)

    def test_model_file_and_ports(self) -> None:
        self.assertError(LOCAL, "backends[0].model_path", "model file not found: /m/a.gguf",
                         is_file=lambda path: False)
        self.assertError(LOCAL + "port = 8000\n", "backends[0].port",
                         "port 8000 is used by the gateway itself",
                         defaults=LocalDefaults(reserved_ports=frozenset({8000})))
        self.assertError(LOCAL + "port = 9000\n" + LOCAL.replace('"a"', '"b"') + "port = 9000\n",
                         "backends[1].port", "port 9000 is also used by backend 'a'")
        self.assertError(LOCAL, "backends[0].port", "no free port",
                         defaults=LocalDefaults(port_base=65535,
                                                reserved_ports=frozenset({65535})))

    def test_remote(self) -> None:
        for url in ["ftp://x", "http://", "x", "http://h/v1?q=1", "http://h/#f", "http://h:99999",
                    "http://h x"]:
            self.assertError(REMOTE.replace("http://up:9000/v1", url), "backends[0].base_url",
                             "expected an http(s) URL")
        self.assertError(REMOTE.replace("http://up", "https://user:pw@up"),
                         "backends[0].base_url", "must not contain credentials")
        self.assertError(REMOTE + 'api_key_env = "MISSING"\n', "backends[0].api_key_env",
                         "environment variable MISSING is not set")
        self.assertError(REMOTE + 'api_key_env = "EMPTY"\n', "backends[0].api_key_env",
                         "environment variable EMPTY is empty", environ={"EMPTY": " "})
        self.assertError(REMOTE + 'api_key_env = "sk-123"\n', "backends[0].api_key_env",
                         "is not an environment variable name")
        self.assertError(REMOTE + "verify_tls = 1\n", "backends[0].verify_tls",
                         "expected true or false, got an integer")
        self.assertError(REMOTE + "api_key = 'x'\n", "backends[0].api_key", "unknown key")
        self.assertIsNone(parse(REMOTE).backends[0].api_key)
        self.assertError(REMOTE + "upstream_models = { x = 'y' }\n",
                         "backends[0].upstream_models.x", "not in this backend's models")
        self.assertError(REMOTE + "upstream_models = { r = 1 }\n",
                         "backends[0].upstream_models.r", "expected a non-empty string")
        self.assertError(REMOTE + "upstream_models = 1\n", "backends[0].upstream_models",
                         "expected a table")

    def test_breaker(self) -> None:
        for header, table in [("[breaker]", "breaker"), ("[backends.breaker]",
                                                        "backends[0].breaker")]:
            base = LOCAL + header + "\n"
            self.assertError(base + "failure_treshold = 1\n", f"{table}.failure_treshold",
                             "unknown key (expected one of: failure_threshold, reset_timeout, "
                             "success_threshold, half_open_max, enabled)")
            self.assertError(base + "failure_threshold = 0\n", f"{table}.failure_threshold",
                             ">= 1")
            self.assertError(base + "success_threshold = 0\n", f"{table}.success_threshold",
                             ">= 1")
            self.assertError(base + "half_open_max = 0\n", f"{table}.half_open_max", ">= 1")
            self.assertError(base + "reset_timeout = 0\n", f"{table}.reset_timeout", "> 0")
            self.assertError(base + "enabled = 'no'\n", f"{table}.enabled", "true or false")
        self.assertError(LOCAL + "breaker = 1\n", "backends[0].breaker", "expected a table")

    def test_failover_and_local(self) -> None:
        self.assertError(LOCAL + "[failover]\nmax_attempts = 0\n", "failover.max_attempts",
                         "between 1 and 100")
        self.assertError(LOCAL + "[failover]\nattempts = 2\n", "failover.attempts",
                         "unknown key (expected one of: max_attempts)")
        self.assertError(LOCAL + "[local]\nport_base = 0\n", "local.port_base",
                         "between 1 and 65535")
        self.assertError(LOCAL + "[local]\nctx = -5\n", "local.ctx", ">= 0")
        self.assertError(LOCAL + "[local]\nmodel_path = 'x'\n", "local.model_path",
                         "unknown key")

    def test_models_tables(self) -> None:
        self.assertError(LOCAL + "[models.b]\nstrategy = 'priority'\n", "models.b",
                         "no backend serves model 'b'")
        self.assertError(LOCAL + "[models]\na = 1\n", "models.a", "expected a table")
        self.assertError(LOCAL + "[models.a]\nstrategy = 'fastest'\n", "models.a.strategy",
                         "unknown strategy 'fastest' (expected one of: priority, round-robin, "
                         "least-busy, cache_affinity)")
        self.assertError(LOCAL + "[models.a]\nstrategy = 1\n", "models.a.strategy",
                         "expected a string")
        self.assertError(LOCAL + "[models.a]\nalias = ['x']\n", "models.a.alias",
                         "unknown key (expected one of: strategy, aliases, default, pin_slot)")
        self.assertError(LOCAL + "[models.a]\naliases = 'x'\n", "models.a.aliases",
                         "expected a list")
        self.assertError(LOCAL + "[models.a]\naliases = ['a']\n", "models.a.aliases[0]",
                         "'a' is already a model name")
        self.assertError(LOCAL + "[models.a]\naliases = ['x', 'x']\n", "models.a.aliases[1]",
                         "listed twice")
        two = LOCAL + LOCAL.replace('"a"', '"b"')
        self.assertError(two + "[models.a]\naliases = ['x']\n[models.b]\naliases = ['x']\n",
                         "models.b.aliases[0]", "already an alias of 'a'")
        self.assertError(LOCAL + "[models.a]\ndefault = 'yes'\n", "models.a.default",
                         "true or false")
        self.assertError(two + "[models.a]\ndefault = true\n[models.b]\ndefault = true\n",
                         "models.b.default", "model 'a' is already the default model")
        self.assertError(
            '[[backends]]\nname = "x"\nmodel_path = "/m"\nmodels = ["org/m"]\n'
            '[models."org/m"]\nstrategy = "x"\n', 'models."org/m".strategy', "unknown strategy")

    def test_keys(self) -> None:
        self.assertError(LOCAL + "[keys.alice]\nmodels = ['zzz']\n", "keys.alice.models[0]",
                         "unknown model 'zzz'")
        self.assertError(LOCAL + "[keys.alice]\nmodel = ['a']\n", "keys.alice.model",
                         "unknown key (expected one of: models)")
        self.assertError(LOCAL + "[keys.alice]\n", "keys.alice.models", "missing")
        self.assertError(LOCAL + "[keys]\nalice = ['a']\n", "keys.alice", "expected a table")
        self.assertError(LOCAL + '[keys."a b"]\nmodels = []\n', 'keys."a b"', "invalid key id")
        self.assertError(LOCAL + "[keys.alice]\nmodels = 'a'\n", "keys.alice.models",
                         "expected a list of strings")


GROUPED = """
[[groups]]
name = "gpu0"
max_running = 1
swap_grace = 5
swap_batch = 2
swap_wait = 7
preload = ["qwen"]

[[backends]]
name = "qwen"
model_path = "/m/qwen.gguf"
models = ["qwen"]
group = "gpu0"
start = "on_demand"
idle_ttl = 600

[[backends]]
name = "llama"
model_path = "/m/llama.gguf"
models = ["llama"]
group = "gpu0"
start = "on_demand"

[[backends]]
name = "solo"
model_path = "/m/solo.gguf"
models = ["solo"]
start = "on_demand"
idle_ttl = 0.5
"""


class OnDemandTests(SynchronousTestCase):
    """``start``, ``idle_ttl``, ``group`` and ``[[groups]]``."""

    def test_defaults_change_nothing(self) -> None:
        spec = parse(LOCAL).backend("a")
        assert isinstance(spec, LocalBackendSpec)
        self.assertEqual((spec.start, spec.idle_ttl, spec.group, spec.on_demand),
                         (Start.ALWAYS, 0.0, None, False))
        self.assertEqual(parse(LOCAL).groups, ())

    def test_groups(self) -> None:
        table = parse(GROUPED)
        self.assertEqual(table.groups, (GroupSpec("gpu0", 1, 5.0, 2, ("qwen",), 7.0),))
        self.assertEqual([s.name for s in table.group_members("gpu0")], ["qwen", "llama"])
        qwen, solo = table.backend("qwen"), table.backend("solo")
        assert isinstance(qwen, LocalBackendSpec) and isinstance(solo, LocalBackendSpec)
        self.assertEqual((qwen.start, qwen.idle_ttl, qwen.group), (Start.ON_DEMAND, 600.0, "gpu0"))
        self.assertEqual((solo.on_demand, solo.idle_ttl, solo.group), (True, 0.5, None))
        defaults = parse('[[groups]]\nname = "g"\n' + LOCAL.replace(
            'models', 'start = "on_demand"\ngroup = "g"\nmodels')).group("g")
        self.assertEqual(defaults, GroupSpec("g", 0, DEFAULT_SWAP_GRACE, DEFAULT_SWAP_BATCH, ()))

    def test_reload_needs_no_restart(self) -> None:
        old = parse(GROUPED)
        new = parse(GROUPED.replace("idle_ttl = 600", "idle_ttl = 60"))
        self.assertEqual(diff(old, new).changed, frozenset({"qwen"}))
        self.assertFalse(needs_restart(old.backend("qwen"), new.backend("qwen")))

    def assertError(self, text: str, where: str, fragment: str) -> None:
        message = str(self.assertRaises(BackendsFileError, parse, text))
        self.assertTrue(message.startswith(f"backends.toml: {where}: "), message)
        self.assertIn(fragment, message)

    def test_invalid(self) -> None:
        on_demand = LOCAL.replace("models", 'start = "on_demand"\nmodels')
        self.assertError(LOCAL.replace("models", 'start = "lazy"\nmodels'),
                         "backends[0].start", 'expected "always" or "on_demand"')
        self.assertError(LOCAL.replace("models", "idle_ttl = 5\nmodels"),
                         "backends[0].idle_ttl", 'only for start = "on_demand"')
        self.assertError(LOCAL.replace("models", 'group = "g"\nmodels'),
                         "backends[0].group", 'only for start = "on_demand"')
        self.assertError(on_demand.replace("models", "idle_ttl = -1\nmodels"),
                         "backends[0].idle_ttl", ">= 0")
        self.assertError(on_demand.replace("models", 'idle_ttl = "1"\nmodels'),
                         "backends[0].idle_ttl", "expected a number")
        self.assertError(on_demand.replace("models", 'group = "g"\nmodels'),
                         "backends[0].group", "no [[groups]] is called 'g'")
        self.assertError(REMOTE.replace("models", 'start = "on_demand"\nmodels'),
                         "backends[0].start", "only for local backends")
        self.assertError("groups = 1\n" + LOCAL, "groups", "array of tables")
        self.assertError("[[groups]]\nmax_running = 1\n" + LOCAL, "groups[0].name", "missing")
        self.assertError('[[groups]]\nname = "g"\n[[groups]]\nname = "g"\n' + LOCAL,
                         "groups[1].name", "duplicate")
        self.assertError('[[groups]]\nname = "g"\nmax_running = -1\n' + LOCAL,
                         "groups[0].max_running", "between 0 and 1000")
        self.assertError('[[groups]]\nname = "g"\nswap_grace = 0\n' + LOCAL,
                         "groups[0].swap_grace", "> 0")
        self.assertError('[[groups]]\nname = "g"\nswap_wait = -1\n' + LOCAL,
                         "groups[0].swap_wait", "> 0")
        self.assertError('[[groups]]\nname = "g"\nswap_batch = 0\n' + LOCAL,
                         "groups[0].swap_batch", "between 1 and")
        self.assertError('[[groups]]\nname = "g"\nspare = 1\n' + LOCAL,
                         "groups[0].spare", "unknown key")
        self.assertError('[[groups]]\nname = "g"\npreload = ["a"]\n' + LOCAL,
                         "groups[0].preload[0]", "'a' is not a backend of group 'g'")
        self.assertError(GROUPED.replace('preload = ["qwen"]', 'preload = ["qwen", "llama"]'),
                         "groups[0].preload", "2 backends preloaded but max_running is 1")


class SingleBackendTests(SynchronousTestCase):
    """Without a backends file the table describes exactly today's single backend."""

    def setUp(self) -> None:
        self.model = self.mktemp() + ".gguf"
        Path(self.model).write_bytes(b"GGUF")

    def test_supervised(self) -> None:
        config = env_config(MODEL_PATH=self.model, MODEL_ALIAS="tiny", PARALLEL="2", CTX="2048",
                            NGL="0", THREADS="3", EXTRA_ARGS="--foo bar", PORT_BACKEND="8090")
        table = single_backend_table(config)
        (spec,) = table.backends
        assert isinstance(spec, LocalBackendSpec)
        self.assertEqual(spec.name, "llama-server")
        self.assertEqual(spec.models, ("tiny",))
        self.assertEqual(spec.base_url, config.backend_base_url)
        self.assertEqual(spec.max_concurrent, 2)  # tap: MAX_CONCURRENT_REQUESTS or PARALLEL or 4
        self.assertEqual(spec.known_slots, 2)
        self.assertEqual(table.default_model, "tiny")
        self.assertEqual(table.models, (ModelSpec("tiny", Strategy.PRIORITY, (), True),))
        self.assertTrue(table.route_unknown_models)
        self.assertFalse(spec.breaker.enabled)
        self.assertEqual(spec.timeouts, Timeouts(10.0, 300.0, 300.0))
        # the child is launched exactly as in single-model mode
        child = spec.child_config(config)
        self.assertEqual(build_args(child, "/k"), build_args(config, "/k"))
        self.assertEqual(child.instance_id, "host-llama-server")
        self.assertEqual(dataclasses.replace(child, instance_id=config.instance_id), config)
        self.assertEqual(single_backend_table(env_config(MODEL_PATH=self.model))
                         .backends[0].max_concurrent, 4)
        self.assertEqual(single_backend_table(env_config(
            MODEL_PATH=self.model, MAX_CONCURRENT_REQUESTS="7", PARALLEL="2")
        ).backends[0].max_concurrent, 7)

    def test_external(self) -> None:
        config = env_config(BACKEND_URL="http://10.0.0.1:8080/", BACKEND_API_KEY="k" * 20,
                            MODEL_ALIAS="m")
        (spec,) = single_backend_table(config).backends
        assert isinstance(spec, RemoteBackendSpec)
        self.assertEqual(spec.name, "http://10.0.0.1:8080")  # tap's name for the backend
        self.assertEqual(spec.base_url, config.backend_base_url)
        self.assertEqual(spec.api_key, "k" * 20)
        self.assertEqual(spec.max_concurrent, 4)
        self.assertEqual(upstream_url(spec.base_url, "/v1/models"), "http://10.0.0.1:8080/v1/models")
        no_key = single_backend_table(env_config(BACKEND_URL="http://h", PARALLEL="3"))
        self.assertIsNone(no_key.backends[0].api_key)
        self.assertEqual(no_key.backends[0].max_concurrent, 3)


class UpstreamUrlTests(SynchronousTestCase):
    def test_join(self) -> None:
        cases = [
            ("http://127.0.0.1:8080", "/v1/chat/completions",
             "http://127.0.0.1:8080/v1/chat/completions"),
            ("http://127.0.0.1:8080", "/health", "http://127.0.0.1:8080/health"),
            ("http://h:9000/v1", "/v1/chat/completions", "http://h:9000/v1/chat/completions"),
            ("http://h:9000/v1/", "/v1/models?a=1", "http://h:9000/v1/models?a=1"),
            ("http://h:9000/v1", "/v1", "http://h:9000/v1"),
            ("http://h:9000/v1", "/v1?x", "http://h:9000/v1?x"),
            ("http://h:9000/v1", "/tokenize", "http://h:9000/tokenize"),
            ("http://h:9000/v1", "/v1beta/x", "http://h:9000/v1beta/x"),
            ("https://api.x.com/openai/v1", "/v1/embeddings",
             "https://api.x.com/openai/v1/embeddings"),
            ("https://h/prefix", "/v1/models", "https://h/prefix/v1/models"),
            ("http://v1", "/v1/models", "http://v1/v1/models"),
        ]
        for base, target, expected in cases:
            self.assertEqual(upstream_url(base, target), expected, (base, target))
        self.assertEqual(upstream_url_bytes("http://h/v1", b"/v1/completions?x=%20"),
                         b"http://h/v1/completions?x=%20")


class DiffTests(SynchronousTestCase):
    def test_added_removed_changed(self) -> None:
        old = parse(EXAMPLE)
        new = parse(EXAMPLE.replace("priority = 2", "priority = 3").replace(
            'name = "local-a"', 'name = "local-b"'))
        added, removed, changed = diff(old, new)
        self.assertEqual((added, removed, changed),
                         (frozenset({"local-b"}), frozenset({"local-a"}), frozenset({"remote"})))
        self.assertEqual(diff(old, parse(EXAMPLE)), (frozenset(), frozenset(), frozenset()))
        self.assertFalse(needs_restart(old.backend("remote"), new.backend("remote")))

    def test_needs_restart(self) -> None:
        table = parse(EXAMPLE)
        local, remote = table.backends
        routing_only: dict[str, Any] = {
            "priority": 7, "weight": 3, "slots": 9, "timeouts": Timeouts(1, 2, 3),
            "breaker": BreakerSettings(failure_threshold=1),
        }
        for field, value in routing_only.items():
            self.assertFalse(needs_restart(local, dataclasses.replace(local, **{field: value})))
            self.assertFalse(needs_restart(remote, dataclasses.replace(remote, **{field: value})))
        self.assertFalse(needs_restart(local, dataclasses.replace(local, models=("a", "b"))))
        process: dict[str, Any] = {"model_path": "/x", "port": 1, "ctx": 1, "ngl": 1, "threads": 1,
                                   "parallel": 1, "extra_args": ("-x",), "models": ("b", "a")}
        for field, value in process.items():
            self.assertTrue(needs_restart(local, dataclasses.replace(local, **{field: value})),
                            field)
        connection: dict[str, Any] = {"base_url": "http://o", "api_key": "k2", "verify_tls": False}
        for field, value in connection.items():
            self.assertTrue(needs_restart(remote, dataclasses.replace(remote, **{field: value})),
                            field)
        self.assertTrue(needs_restart(local, remote))
        changed = parse(EXAMPLE.replace("/models/a.gguf", "/models/a2.gguf"))
        self.assertEqual(diff(table, changed).changed, frozenset({"local-a"}))
        rekeyed = parse(EXAMPLE, {"REMOTE_KEY": "other"})
        self.assertEqual(diff(table, rekeyed).changed, frozenset({"remote"}))


class UnsafeFileTests(SynchronousTestCase):
    """Issue 15.6: the backends file is read as a bounded regular file (never a FIFO)."""

    def test_fifo_is_refused_at_once(self) -> None:
        path = self.mktemp()
        os.mkfifo(path)
        with self.assertRaises(backends_file.BackendsFileError) as caught:
            backends_file.load_backends_file(path, {})
        self.assertIn("not a regular file", str(caught.exception))

    def test_dev_zero_is_refused(self) -> None:
        path = self.mktemp()
        os.symlink("/dev/zero", path)
        with self.assertRaises(backends_file.BackendsFileError) as caught:
            backends_file.load_backends_file(path, {})
        self.assertIn("not a regular file", str(caught.exception))
