"""Tests for llamaproxy.config: precedence, strict parsing, model resolution, documentation."""

from __future__ import annotations

import os
import re
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from llamaproxy.config import (
    SETTINGS,
    ConfigError,
    detect_data_dir,
    documented_names,
    load_config,
    parse_bool,
    sanitize_instance_id,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
_BOOL_WORDS = {"true", "false", "1", "0", "yes", "no", "on", "off"}


class ConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.model = self.mktemp() + ".gguf"
        Path(self.model).write_bytes(b"GGUF")
        self.env = {"MODEL_PATH": self.model}

    def load(self, env: dict[str, str] | None = None, **flags: object):  # type: ignore[no-untyped-def]
        return load_config(flags, {**self.env, **(env or {})}, path_exists=lambda p: False,
                           hostname=lambda: "host/1")

    def test_defaults(self) -> None:
        config = self.load()
        self.assertEqual(config.endpoints, ("tcp:8000:backlog=511",))
        self.assertEqual(config.health_endpoint, "tcp:8001")
        self.assertEqual(config.backend_base_url, "http://127.0.0.1:8080")
        self.assertTrue(config.auth_enabled)
        self.assertTrue(config.supervised)
        self.assertEqual(config.ctx, 16384)
        self.assertEqual(config.ngl, 99)
        self.assertEqual(config.data_dir, "/data")
        self.assertEqual(config.auth_keys_file, "/data/api_keys.txt")
        self.assertEqual(config.model_alias, Path(self.model).name.removesuffix(".gguf"))
        self.assertEqual(config.instance_id, "host_1")

    def test_flag_beats_env_beats_default(self) -> None:
        self.assertEqual(self.load({"PORT": "9000"}).port, 9000)
        self.assertEqual(self.load({"GATEWAY_PORT": "9001"}).port, 9001)
        self.assertEqual(self.load({"PORT": "9000"}, port="9100").port, 9100)

    def test_listen_and_host(self) -> None:
        self.assertEqual(self.load({"HOST": "127.0.0.1"}).endpoints,
                         ("tcp:8000:interface=127.0.0.1:backlog=511",))
        self.assertEqual(self.load({"HOST": "::1"}).endpoints,
                         ("tcp:8000:interface=\\:\\:1:backlog=511",))
        self.assertEqual(self.load({"LISTEN_BACKLOG": "4096"}).endpoints,
                         ("tcp:8000:backlog=4096",))
        for bad in ("0", "-1", "65536", "lots"):
            with self.assertRaises(ConfigError):
                self.load({"LISTEN_BACKLOG": bad})
        config = self.load({"LISTEN": "tcp:1, unix:/tmp/s"})
        self.assertEqual(config.endpoints, ("tcp:1", "unix:/tmp/s"))
        self.assertEqual(self.load(listen=["tcp:2", "tcp:3"]).endpoints, ("tcp:2", "tcp:3"))

    def test_booleans_are_strict(self) -> None:
        for text in ("true", "TRUE", "1", "yes", "On"):
            self.assertTrue(self.load({"AUTH_ENABLED": text}).auth_enabled, text)
        for text in ("false", "0", "no", "OFF"):
            self.assertFalse(self.load({"AUTH_ENABLED": text}).auth_enabled, text)
        with self.assertRaises(ConfigError) as raised:
            self.load({"AUTH_ENABLED": "maybe"})
        self.assertIn("AUTH_ENABLED", str(raised.exception))

    def test_numbers_are_strict(self) -> None:
        for env in ({"PORT": "80a"}, {"PORT": "70000"}, {"CTX": "-1"}, {"REQUEST_TIMEOUT": "0"},
                    {"REQUEST_TIMEOUT": "nan"}, {"MAX_QUEUE_SIZE": "1.5"}, {"PORT_HEALTH": ""}):
            with self.assertRaises(ConfigError) as raised:
                self.load(env)
            self.assertIn(next(iter(env)), str(raised.exception))
        with self.assertRaises(ConfigError) as raised:
            self.load(ctx="x")
        self.assertIn("--ctx", str(raised.exception))

    def test_model_resolution(self) -> None:
        directory = os.path.dirname(self.model)
        config = load_config(
            {}, {"MODELS_DIR": directory, "MODEL_NAME": os.path.basename(self.model)}
        )
        self.assertEqual(config.model_path, self.model)
        with self.assertRaises(ConfigError) as raised:
            load_config({}, {"MODEL_PATH": "/nonexistent/m.gguf"})
        self.assertIn("/nonexistent/m.gguf", str(raised.exception))
        with self.assertRaises(ConfigError) as raised:
            load_config({}, {})
        self.assertIn("MODEL_PATH", str(raised.exception))

    def test_external_backend_needs_no_model(self) -> None:
        config = load_config({}, {"BACKEND_URL": "http://10.0.0.5:8080/"})
        self.assertFalse(config.supervised)
        self.assertEqual(config.backend_base_url, "http://10.0.0.5:8080")
        with self.assertRaises(ConfigError):
            load_config({}, {"BACKEND_URL": "ftp://x"})

    def test_deprecated_backend_port(self) -> None:
        config = self.load({"BACKEND_PORT": "9999"})
        self.assertEqual(config.backend_port, 9999)
        self.assertTrue(any("BACKEND_PORT" in w for w in config.warnings))
        self.assertEqual(self.load({"BACKEND_PORT": "9999", "PORT_BACKEND": "7"}).backend_port, 7)

    def test_older_variables_we_do_not_use_warn(self) -> None:
        config = self.load({"MOCK_BACKEND": "true"})
        self.assertTrue(any(w.startswith("MOCK_BACKEND is not used") and "BACKEND_URL" in w
                            for w in config.warnings))

    def test_tls_files_come_in_pairs(self) -> None:
        with self.assertRaises(ConfigError):
            self.load({"TLS_CERT_FILE": "/c.pem"})
        config = self.load({"TLS_CERT_FILE": "/c.pem", "TLS_KEY_FILE": "/k.pem"})
        self.assertEqual(config.tls_min_version, "1.2")

    def test_log_and_token_settings(self) -> None:
        config = self.load({"LOG_FORMAT": "JSON", "KEY_TOKENS_PER_MINUTE": "alice=5, bob=0"})
        self.assertEqual((config.log_format, config.access_log_format), ("json", "json"))
        self.assertEqual(config.key_tokens_per_minute, (("alice", 5), ("bob", 0)))
        with self.assertRaises(ConfigError) as raised:
            self.load({"KEY_TOKENS_PER_MINUTE": "alice"})
        self.assertIn("KEY_TOKENS_PER_MINUTE", str(raised.exception))

    def test_log_levels(self) -> None:
        config = self.load({})
        self.assertEqual((config.log_level, config.child_request_log_level), ("info", "debug"))
        config = self.load({"LOG_LEVEL": "Warning", "CHILD_REQUEST_LOG_LEVEL": "info"})
        self.assertEqual((config.log_level, config.child_request_log_level), ("warn", "info"))
        for name in ("LOG_LEVEL", "CHILD_REQUEST_LOG_LEVEL"):
            with self.assertRaises(ConfigError) as raised:
                self.load({name: "verbose"})
            self.assertIn(name, str(raised.exception))

    def test_extra_args_warn_and_split(self) -> None:
        config = self.load({"EXTRA_ARGS": "--embeddings --pooling 'mean'"})
        self.assertEqual(config.extra_args, ("--embeddings", "--pooling", "mean"))
        self.assertTrue(any("EXTRA_ARGS" in w for w in config.warnings))
        with self.assertRaises(ConfigError):
            self.load({"EXTRA_ARGS": "'unclosed"})

    def test_proxy_extra_paths(self) -> None:
        config = self.load({"PROXY_EXTRA_PATHS": "/tokenize,/detokenize"})
        self.assertEqual(config.proxy_extra_paths, ("/tokenize", "/detokenize"))
        with self.assertRaises(ConfigError) as raised:
            self.load({"PROXY_EXTRA_PATHS": "/slots"})
        self.assertIn("/slots", str(raised.exception))

    def test_health_port_zero_disables(self) -> None:
        self.assertIsNone(self.load({"PORT_HEALTH": "0"}).health_endpoint)

    def test_data_dir_detection(self) -> None:
        self.assertEqual(detect_data_dir(lambda p: p == "/data"), "/data")
        self.assertEqual(detect_data_dir(lambda p: p == "/runpod-volume"), "/runpod-volume")
        self.assertEqual(detect_data_dir(lambda p: p == "/workspace"), "/workspace")
        self.assertEqual(detect_data_dir(lambda p: False), "/data")

    def test_instance_id_sanitised(self) -> None:
        self.assertEqual(sanitize_instance_id("../../etc/passwd"), "_.._etc_passwd")
        self.assertEqual(sanitize_instance_id(""), "unknown")

    @given(st.text(max_size=12))
    def test_parse_bool_accepts_only_known_words(self, text: str) -> None:
        try:
            parse_bool(text)
        except ValueError:
            self.assertNotIn(text.strip().lower(), _BOOL_WORDS)
        else:
            self.assertIn(text.strip().lower(), _BOOL_WORDS)

    def test_every_option_is_documented(self) -> None:
        text = DOCS.read_text()
        missing = [
            name for name in documented_names() if not re.search(re.escape(name) + r"\b", text)
        ]
        self.assertEqual(missing, [])
        self.assertEqual(len({s.flag for s in SETTINGS}), len(SETTINGS))


class AdminPageConfigTests(SynchronousTestCase):
    """ADMIN_LISTEN and ADMIN_SESSION_TTL: off by default, strict, and only with admin keys."""

    def setUp(self) -> None:
        self.model = self.mktemp() + ".gguf"
        Path(self.model).write_bytes(b"GGUF")

    def load(self, env: dict[str, str]):  # type: ignore[no-untyped-def]
        return load_config({}, {"MODEL_PATH": self.model, **env}, path_exists=lambda p: False,
                           hostname=lambda: "h")

    def test_off_by_default(self) -> None:
        config = self.load({})
        self.assertEqual(config.admin_listen, "")
        self.assertEqual(config.admin_session_ttl, 3600.0)

    def test_on_with_admin_keys(self) -> None:
        config = self.load({"ADMIN_LISTEN": "tcp:8002:interface=127.0.0.1",
                            "ADMIN_KEY_IDS": "boss", "ADMIN_SESSION_TTL": "900"})
        self.assertEqual(config.admin_listen, "tcp:8002:interface=127.0.0.1")
        self.assertEqual(config.admin_session_ttl, 900.0)

    def test_refusals(self) -> None:
        for env, words in [
            ({"ADMIN_LISTEN": "8002", "ADMIN_KEY_IDS": "boss"}, "ADMIN_LISTEN"),
            ({"ADMIN_LISTEN": "tcp:8002"}, "ADMIN_KEY_IDS"),
            ({"ADMIN_LISTEN": "tcp:8002", "ADMIN_KEY_IDS": "boss", "AUTH_ENABLED": "false"},
             "AUTH_ENABLED"),
            ({"ADMIN_SESSION_TTL": "0"}, "ADMIN_SESSION_TTL"),
            ({"ADMIN_SESSION_TTL": "soon"}, "ADMIN_SESSION_TTL"),
        ]:
            with self.assertRaises(ConfigError) as raised:
                self.load(env)
            self.assertIn(words, str(raised.exception), env)


class ListenBacklogTests(SynchronousTestCase):
    """The default listener's backlog reaches the kernel (Twisted's own default is 50)."""

    def test_the_kernel_holds_listen_backlog_connections(self) -> None:
        import shutil
        import subprocess

        from twisted.internet import reactor
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.protocol import Factory, Protocol

        if shutil.which("ss") is None:
            raise SkipTest("ss (iproute2) is not installed")
        model = self.mktemp() + ".gguf"
        Path(model).write_bytes(b"GGUF")
        config = load_config({}, {"MODEL_PATH": model, "PORT": "0", "HOST": "127.0.0.1",
                                  "LISTEN_BACKLOG": "700"}, path_exists=lambda p: False)
        ours = self.successResultOf(serverFromString(reactor, config.endpoints[0])
                                    .listen(Factory.forProtocol(Protocol)))
        self.addCleanup(ours.stopListening)
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol),  # type: ignore[attr-defined]
                                 interface="127.0.0.1")  # (Twisted's default: 50)
        self.addCleanup(port.stopListening)
        listening = ours.getHost().port  # type: ignore[attr-defined]
        lines = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True,
                               check=True).stdout.splitlines()

        def backlog(number: int) -> int:
            for line in lines:
                fields = line.split()
                if fields[3].endswith(f":{number}"):
                    return int(fields[2])
            raise AssertionError(f"port {number} not listening: {lines}")

        self.assertEqual(backlog(port.getHost().port), 50)
        self.assertEqual(backlog(listening), 700)
