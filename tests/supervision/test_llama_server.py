"""Tests for llamaproxy.supervision.llama_server: lookup, arguments, environment, key file, exit
codes."""

from __future__ import annotations

import dataclasses
import os
import stat
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llamaproxy import LLAMA_CPP_VERSION
from llamaproxy.config import Config, ConfigError, load_config
from llamaproxy.supervision.llama_server import (
    BackendKeyFile,
    BackendKeyFileError,
    LlamaServerNotFound,
    build_args,
    cached_build_path,
    child_environment,
    default_key_dir,
    describe_exit,
    error_line,
    find_llama_server,
    format_exit,
    spawn_command,
)


def make_config(**overrides: Any) -> Config:
    """A valid Config (built by load_config, so new settings get their defaults), then overrides."""
    config = load_config(
        {},
        {"MODEL_PATH": __file__, "DATA_DIR": "/data", "INSTANCE_ID": "test"},
        path_exists=lambda _: False,
        hostname=lambda: "host",
    )
    values: dict[str, Any] = {
        "model_path": "/models/tiny.gguf",
        "model_alias": "tiny",
        "backend_port": 8080,
        "ctx": 4096,
        "ngl": 99,
        "threads": 0,
        "parallel": 0,
        "extra_args": (),
    }
    values.update(overrides)
    return dataclasses.replace(config, **values)


def make_executable(directory: str, name: str = "llama-server") -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(path, 0o755)
    return path


class FindLlamaServerTests(SynchronousTestCase):
    """find_llama_server: explicit → PATH → cached build → a helpful error."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(_rmtree, self.tmp)
        self.cache = os.path.join(self.tmp, "cache")
        self.environ = {"PATH": "/nowhere", "LLAMAPROXY_CACHE_DIR": self.cache, "HOME": self.tmp}
        self.which_calls: list[tuple[str, str | None]] = []

    def which(self, result: str | None) -> Callable[..., str | None]:
        def fake_which(name: str, path: str | None = None) -> str | None:
            self.which_calls.append((name, path))
            return result

        return fake_which

    def test_explicit_path(self) -> None:
        binary = make_executable(self.tmp, "my-llama-server")
        found = find_llama_server(binary, self.environ, which=self.which("/usr/bin/llama-server"))
        self.assertEqual(found, binary)

    def test_explicit_missing(self) -> None:
        missing = os.path.join(self.tmp, "nope")
        with self.assertRaises(LlamaServerNotFound) as cm:
            find_llama_server(missing, self.environ, which=self.which("/usr/bin/llama-server"))
        self.assertIn(missing, str(cm.exception))
        self.assertIn("does not exist", str(cm.exception))
        self.assertIsInstance(cm.exception, ConfigError)

    def test_explicit_not_executable(self) -> None:
        path = os.path.join(self.tmp, "plain")
        with open(path, "w") as f:
            f.write("x")
        os.chmod(path, 0o644)
        if os.access(path, os.X_OK):  # root may execute anything with an x bit; 0644 has none
            self.skipTest("cannot make a non-executable file here")
        with self.assertRaises(LlamaServerNotFound) as cm:
            find_llama_server(path, self.environ, which=self.which(None))
        self.assertIn("not an executable", str(cm.exception))

    def test_explicit_name_looked_up_on_path(self) -> None:
        found = find_llama_server(
            "llama-server-cuda", self.environ, which=self.which("/opt/bin/llama-server-cuda")
        )
        self.assertEqual(found, "/opt/bin/llama-server-cuda")
        self.assertEqual(self.which_calls, [("llama-server-cuda", "/nowhere")])

    def test_path(self) -> None:
        found = find_llama_server(None, self.environ, which=self.which("/usr/bin/llama-server"))
        self.assertEqual(found, "/usr/bin/llama-server")
        self.assertEqual(self.which_calls, [("llama-server", "/nowhere")])

    def test_cached_build(self) -> None:
        target = os.path.join(self.cache, f"llama-server-{LLAMA_CPP_VERSION}")
        os.makedirs(target)
        binary = make_executable(target)
        self.assertEqual(cached_build_path(self.environ), binary)
        self.assertEqual(find_llama_server(None, self.environ, which=self.which(None)), binary)

    def test_path_before_cached_build(self) -> None:
        target = os.path.join(self.cache, f"llama-server-{LLAMA_CPP_VERSION}")
        os.makedirs(target)
        make_executable(target)
        found = find_llama_server(None, self.environ, which=self.which("/usr/bin/llama-server"))
        self.assertEqual(found, "/usr/bin/llama-server")

    def test_not_found(self) -> None:
        with self.assertRaises(LlamaServerNotFound) as cm:
            find_llama_server(None, self.environ, which=self.which(None))
        message = str(cm.exception)
        self.assertIn("scripts/build-llama-server.sh", message)
        self.assertIn("LLAMA_SERVER", message)
        self.assertIn(cached_build_path(self.environ), message)

    def test_cached_build_path_rules(self) -> None:
        """The same defaults as scripts/build-llama-server.sh (empty counts as unset)."""
        leaf = f"llama-server-{LLAMA_CPP_VERSION}/llama-server"
        self.assertEqual(
            cached_build_path({"LLAMAPROXY_CACHE_DIR": "/c", "XDG_CACHE_HOME": "/x"}),
            f"/c/{leaf}",
        )
        self.assertEqual(
            cached_build_path({"XDG_CACHE_HOME": "/x", "HOME": "/h"}), f"/x/llamaproxy/{leaf}"
        )
        self.assertEqual(
            cached_build_path({"XDG_CACHE_HOME": "", "HOME": "/h"}), f"/h/.cache/llamaproxy/{leaf}"
        )

    def test_build_script_agrees(self) -> None:
        """scripts/build-llama-server.sh pins the same release."""
        script = os.path.join(
            os.path.dirname(__file__), "..", "..", "scripts", "build-llama-server.sh")
        with open(script) as f:
            text = f.read()
        self.assertIn(f"LLAMA_CPP_VERSION={LLAMA_CPP_VERSION}\n", text)
        self.assertIn('TARGET_DIR="$CACHE_DIR/llama-server-$LLAMA_CPP_VERSION"', text)


class BuildArgsTests(SynchronousTestCase):
    """build_args: the exact argument list."""

    def test_minimal(self) -> None:
        self.assertEqual(
            build_args(make_config(), "/dev/shm/llama-keys/backend-test.key"),
            [
                "-m", "/models/tiny.gguf",
                "--host", "127.0.0.1",
                "--port", "8080",
                "-c", "4096",
                "-ngl", "99",
                "--api-key-file", "/dev/shm/llama-keys/backend-test.key",
                "--alias", "tiny",
                "--metrics",
            ],
        )  # fmt: skip

    def test_threads_and_parallel(self) -> None:
        args = build_args(make_config(threads=4, parallel=2), "/k")
        self.assertEqual(args[args.index("-t") + 1], "4")
        self.assertEqual(args[args.index("--parallel") + 1], "2")
        self.assertLess(args.index("-t"), args.index("--api-key-file"))

    def test_extra_args_last(self) -> None:
        args = build_args(make_config(extra_args=("--no-webui", "--host", "0.0.0.0")), "/k")
        self.assertEqual(args[-3:], ["--no-webui", "--host", "0.0.0.0"])
        self.assertEqual(args[-6:-3], ["--alias", "tiny", "--metrics"])

    def test_no_key_on_command_line(self) -> None:
        args = build_args(make_config(), "/k")
        self.assertNotIn("--api-key", args)

    def test_no_model(self) -> None:
        self.assertRaises(ConfigError, build_args, make_config(model_path=None), "/k")


class ChildEnvironmentTests(SynchronousTestCase):
    """child_environment passes an allowlist plus the operator's child_env, nothing else."""

    def test_allowlist(self) -> None:
        env = child_environment(
            {
                "PATH": "/bin",
                "HOME": "/home/llama",
                "LANG": "C.UTF-8",
                "LC_ALL": "C.UTF-8",
                "CUDA_VISIBLE_DEVICES": "0",
                "HIP_VISIBLE_DEVICES": "1",
                "OMP_NUM_THREADS": "4",
                "GGML_VK_VISIBLE_DEVICES": "0",
                "LLAMA_API_KEY": "secret",
                "LLAMA_ARG_PORT": "9999",
                "LLAMA_ARG_HOST": "0.0.0.0",
                "OPENAI_API_KEY": "sk-upstream",
                "AWS_SECRET_ACCESS_KEY": "cloud",
                "UPSTREAM_KEY": "named-by-api_key_env",
            },
            [("HF_HOME", "/models")],
        )
        self.assertEqual(
            env,
            {
                "PATH": "/bin",
                "HOME": "/home/llama",
                "LANG": "C.UTF-8",
                "LC_ALL": "C.UTF-8",
                "CUDA_VISIBLE_DEVICES": "0",
                "HIP_VISIBLE_DEVICES": "1",
                "OMP_NUM_THREADS": "4",
                "GGML_VK_VISIBLE_DEVICES": "0",
                "HF_HOME": "/models",
            },
        )

    def test_copy(self) -> None:
        source = {"PATH": "/bin"}
        env = child_environment(source)
        env["X"] = "1"
        self.assertEqual(source, {"PATH": "/bin"})


class ChildEnvironmentOnARealChildTests(TestCase):
    """What a real child spawned through the supervisor's launcher sees in its environment."""

    def test_upstream_secret_never_reaches_the_child(self) -> Deferred[None]:
        from twisted.internet import reactor
        from twisted.internet.utils import getProcessOutput

        parent = {**os.environ, "UPSTREAM_SECRET": "sk-must-not-leak",
                  "LLAMA_API_KEY": "also-not"}
        env = child_environment(parent, [("HF_HOME", "/models")])
        program, argv = spawn_command("/usr/bin/env", ["/usr/bin/env"])
        output = getProcessOutput(program, argv[1:], env=env, reactor=reactor)

        def check(out: bytes) -> None:
            seen = dict(line.split("=", 1) for line in out.decode().splitlines() if "=" in line)
            self.assertNotIn("UPSTREAM_SECRET", seen)
            self.assertNotIn("sk-must-not-leak", out.decode())
            self.assertNotIn("LLAMA_API_KEY", seen)
            self.assertEqual(seen["HF_HOME"], "/models")
            self.assertEqual(seen["PATH"], os.environ["PATH"])

        return output.addCallback(check)


class BackendKeyFileTests(SynchronousTestCase):
    """BackendKeyFile: private directory, 0600 file, wipe on delete."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(_rmtree, self.tmp)
        self.directory = os.path.join(self.tmp, "keys")

    def test_key_shape(self) -> None:
        key_file = BackendKeyFile(self.directory, "box")
        self.assertEqual(len(key_file.key), 51)
        self.assertTrue(key_file.key.startswith("gateway-"))
        self.assertEqual(key_file.prefix, key_file.key[:8])
        self.assertNotEqual(key_file.key, BackendKeyFile(self.directory, "box").key)
        self.assertEqual(os.path.dirname(key_file.path), self.directory)
        self.assertRegex(os.path.basename(key_file.path),
                         rf"^backend-box\.[0-9a-f]{{8}}\.{os.getpid()}\.[0-9a-f]{{12}}\.key$")
        self.assertFalse(key_file.written)

    def test_repr_hides_key(self) -> None:
        key_file = BackendKeyFile(self.directory, "box")
        self.assertNotIn(key_file.key, repr(key_file))
        self.assertIn(key_file.path, repr(key_file))

    def test_write(self) -> None:
        key_file = BackendKeyFile(self.directory, "box")
        key_file.write()
        self.assertTrue(key_file.written)
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(key_file.path).st_mode), 0o600)
        with open(key_file.path) as f:
            self.assertEqual(f.read(), key_file.key + "\n")
        # no temp file left
        self.assertEqual(os.listdir(self.directory), [os.path.basename(key_file.path)])

    def test_two_gateways_with_one_instance_id_keep_their_own_files(self) -> None:
        first = BackendKeyFile(self.directory, "vm")
        first.write()
        second = BackendKeyFile(self.directory, "vm")
        second.write()
        self.assertNotEqual(first.path, second.path)
        second.delete()  # the second gateway stops
        with open(first.path) as f:
            self.assertEqual(f.read().strip(), first.key)

    def test_rewritten_after_being_removed(self) -> None:
        key_file = BackendKeyFile(self.directory, "vm")
        key_file.write()
        os.unlink(key_file.path)
        self.assertFalse(key_file.exists())
        key_file.write()
        with open(key_file.path) as f:
            self.assertEqual(f.read().strip(), key_file.key)

    def test_files_of_gateways_that_are_gone_are_removed(self) -> None:
        boot = "0123abcd"
        dead, living = 4_000_001, 4_000_002

        def alive(pid: int) -> bool:
            return pid == living

        def make(name: str) -> str:
            path = os.path.join(self.directory, name)
            with open(path, "w") as f:
                f.write("gateway-old\n")
            return path

        os.makedirs(self.directory, 0o700)
        stale = [make(f"backend-vm.{boot}.{dead}.aaaaaaaaaaaa.key"),
                 make(f"backend-vm.99999999.{living}.bbbbbbbbbbbb.key"),  # an earlier boot
                 make(f".backend-vm.{boot}.{dead}.cccccccccccc.key.dddddddddddd.tmp")]
        kept = [make(f"backend-vm.{boot}.{living}.eeeeeeeeeeee.key"),
                make("backend-vm.key"), make("notes.txt")]
        key_file = BackendKeyFile(self.directory, "vm", boot=boot, alive=alive)
        key_file.write()
        self.assertEqual(sorted(os.listdir(self.directory)), sorted(
            [os.path.basename(p) for p in kept] + [os.path.basename(key_file.path)]))
        self.assertTrue(all(not os.path.exists(p) for p in stale))

    def test_instance_id_sanitised(self) -> None:
        key_file = BackendKeyFile(self.directory, "../evil/x")
        self.assertEqual(os.path.dirname(key_file.path), self.directory)

    def test_delete(self) -> None:
        key_file = BackendKeyFile(self.directory, "box")
        key_file.write()
        key_file.delete()
        self.assertFalse(os.path.exists(key_file.path))
        self.assertFalse(key_file.written)
        key_file.delete()  # idempotent
        BackendKeyFile(self.directory, "never-written").delete()

    def test_looser_directory_fixed(self) -> None:
        os.makedirs(self.directory)
        os.chmod(self.directory, 0o755)
        BackendKeyFile(self.directory, "box").write()
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)

    def test_directory_is_a_file(self) -> None:
        with open(self.directory, "w") as f:
            f.write("")
        self.assertRaises(BackendKeyFileError, BackendKeyFile(self.directory, "box").write)

    def test_directory_is_a_symlink(self) -> None:
        real = os.path.join(self.tmp, "real")
        os.mkdir(real, 0o700)
        os.symlink(real, self.directory)
        self.assertRaises(BackendKeyFileError, BackendKeyFile(self.directory, "box").write)

    def test_directory_of_another_user(self) -> None:
        if os.geteuid() != 0:
            self.skipTest("only root can give a directory away")
        os.makedirs(self.directory, 0o700)
        os.chown(self.directory, 65534, 65534)
        with self.assertRaises(BackendKeyFileError) as cm:
            BackendKeyFile(self.directory, "box").write()
        self.assertIn("belongs to uid 65534", str(cm.exception))

    def test_from_config(self) -> None:
        key_file = BackendKeyFile.from_config(make_config(key_dir=self.directory, instance_id="i"))
        self.assertTrue(os.path.basename(key_file.path).startswith("backend-i."))

    def test_default_directory(self) -> None:
        self.assertEqual(default_key_dir(self.tmp), os.path.join(self.tmp, "llama-keys"))
        missing = os.path.join(self.tmp, "no-shm")
        self.assertEqual(
            default_key_dir(missing), os.path.join(tempfile.gettempdir(), "llama-keys")
        )
        self.assertEqual(BackendKeyFile(None, "x").directory, default_key_dir())


class DescribeExitTests(SynchronousTestCase):
    """describe_exit, format_exit and error_line."""

    def test_error_line(self) -> None:
        self.assertEqual(
            error_line("0.00.006.760 E llama_model_load: error loading model: failed to load"),
            "llama_model_load: error loading model: failed to load")
        self.assertIsNone(error_line("0.00.006.760 I srv  load_model: loading model"))
        self.assertIsNone(error_line("0.00.006.760 W a warning that mentions an error"))
        self.assertEqual(error_line("error: failed to open file '/x'"),
                         "error: failed to open file '/x'")
        self.assertIsNone(error_line("usage:"))
        self.assertEqual(format_exit(1, None, "error: failed to open file '/x'"),
                         "exit code 1: error: failed to open file '/x'")

    def test_table(self) -> None:
        cases = [
            ((0, None), "exited normally"),
            ((1, None), "bad model file, unsupported model, or port already in use"),
            ((127, None), "binary not found or not executable"),
            ((134, None), "aborted (assertion failure)"),
            ((None, 6), "aborted (assertion failure)"),
            ((137, None), "killed (out of memory, or SIGKILL)"),
            ((None, 9), "killed (out of memory, or SIGKILL)"),
            ((139, None), "segmentation fault"),
            ((None, 11), "segmentation fault"),
            ((3, None), "exited with code 3"),
            ((None, 15), "killed by signal 15 (SIGTERM)"),
            ((None, None), "unknown exit status"),
        ]
        for (code, sig), meaning in cases:
            self.assertEqual(describe_exit(code, sig), meaning, (code, sig))

    def test_format(self) -> None:
        self.assertEqual(
            format_exit(1, None),
            "exit code 1: bad model file, unsupported model, or port already in use",
        )
        self.assertEqual(
            format_exit(None, 9), "signal 9 (SIGKILL): killed (out of memory, or SIGKILL)"
        )
        self.assertEqual(format_exit(None, None), "unknown exit status")


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
