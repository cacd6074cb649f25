"""Everything about the llama-server binary that is not process supervision.

Finding the binary, building its argument list and environment, the per-boot backend key file it
reads with ``--api-key-file``, and turning its exit status into words for logs and /health.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal as signal_module
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping

from twisted.logger import Logger, LogLevel

from llamaproxy import LLAMA_CPP_VERSION
from llamaproxy.config import Config, ConfigError, sanitize_instance_id

# (llamaproxy.supervision.llama_server is the child's output)
log = Logger(namespace="llamaproxy.backend_key")

#: The name of the binary on PATH and in the cached build directory.
BINARY_NAME = "llama-server"

#: Environment variables llama-server reads as settings; a supervised child never inherits them.
STRIPPED_VARIABLE = "LLAMA_API_KEY"
STRIPPED_PREFIX = "LLAMA_ARG_"

#: Prefix of every per-boot backend key (so a leaked key is recognisable).
KEY_PREFIX = "gateway-"


class LlamaServerNotFound(ConfigError):  # noqa: N818 - reads better at the raise site
    """No usable llama-server binary: the message says where we looked and what to do."""


class BackendKeyFileError(ConfigError):
    """The backend key directory or file is unsafe (wrong owner, type or mode)."""


def cached_build_path(environ: Mapping[str, str]) -> str:
    """Where scripts/build-llama-server.sh puts the binary (same rules as the script)."""
    home = environ.get("HOME") or os.path.expanduser("~")
    cache_root = environ.get("LLAMAPROXY_CACHE_DIR") or os.path.join(
        environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache"), "llamaproxy"
    )
    return os.path.join(cache_root, f"llama-server-{LLAMA_CPP_VERSION}", BINARY_NAME)


def _is_executable_file(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_llama_server(
    explicit: str | None,
    environ: Mapping[str, str],
    which: Callable[..., str | None] = shutil.which,
) -> str:
    """The llama-server to run: --llama-server/LLAMA_SERVER, else PATH, else the cached build.

    ``which`` is called as ``which(name, path=PATH)`` (``shutil.which``'s signature); tests inject
    their own. An explicit value without a slash is looked up on PATH as well.
    """
    search_path = environ.get("PATH")
    if explicit:
        candidate = os.path.expanduser(explicit)
        if os.sep not in candidate:
            found = which(candidate, path=search_path)
            if found:
                return os.path.abspath(found)
        if _is_executable_file(candidate):
            return os.path.abspath(candidate)
        problem = "does not exist" if not os.path.exists(candidate) else "is not an executable file"
        raise LlamaServerNotFound(
            f"llama-server {explicit!r} (from --llama-server / LLAMA_SERVER) {problem}"
        )
    found = which(BINARY_NAME, path=search_path)
    if found:
        return os.path.abspath(found)
    cached = cached_build_path(environ)
    if _is_executable_file(cached):
        return cached
    raise LlamaServerNotFound(
        f"llama-server not found: it is not on PATH and there is no cached build at {cached}. "
        f"Run scripts/build-llama-server.sh to build llama.cpp {LLAMA_CPP_VERSION}, "
        "or set LLAMA_SERVER (--llama-server) to the binary."
    )


def build_args(config: Config, key_file: str) -> list[str]:
    """llama-server's arguments after the program name.

    The server binds to 127.0.0.1 only; the key is passed as a file so it never shows in ``ps``;
    ``--alias`` is always set so clients see the model's name, not its file path, in
    /v1/models and in responses. ``config.extra_args`` come last and can override anything.
    """
    if not config.model_path:
        raise ConfigError("no model: a supervised llama-server needs MODEL_PATH (--model)")
    args = [
        "-m", config.model_path,
        "--host", "127.0.0.1",
        "--port", str(config.backend_port),
        "-c", str(config.ctx),
        "-ngl", str(config.ngl),
    ]  # fmt: skip
    if config.threads > 0:
        args += ["-t", str(config.threads)]
    if config.parallel > 0:
        args += ["--parallel", str(config.parallel)]
    # --metrics: its /metrics (behind the backend key) is re-exported by the gateway's /metrics.
    args += ["--api-key-file", key_file, "--alias", config.model_alias, "--metrics"]
    args += list(config.extra_args)
    return args


def child_environment(
    environ: Mapping[str, str], extra: Iterable[tuple[str, str]] = ()
) -> dict[str, str]:
    """The child's environment: the allowlisted part of ours, plus what the operator added.

    A child gets what a GPU program needs (``CHILD_ENV_NAMES``, ``CHILD_ENV_PREFIXES``: PATH,
    HOME, locale, the loader path, CUDA/ROCm/Vulkan/OpenMP/BLAS and ggml settings) and the
    backends file's ``child_env``; nothing else, so the gateway's secrets (upstream keys named
    by ``api_key_env``, cloud credentials, ...) never reach it. ``LLAMA_ARG_*`` and
    ``LLAMA_API_KEY`` are never passed: llama-server reads them as flags and extra keys.
    """
    env = {
        name: value for name, value in environ.items()
        if _allowed_in_child(name)
    }
    env.update(extra)
    return env


#: Variables a child inherits by name.
CHILD_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "TMPDIR", "TZ", "LANG", "LANGUAGE", "LD_LIBRARY_PATH",
    "XDG_CACHE_HOME",
})

#: Variables a child inherits by prefix: locale, GPU runtimes, threading and BLAS libraries.
CHILD_ENV_PREFIXES = (
    "LC_", "CUDA_", "NVIDIA_", "ROCR_", "ROCM_", "HIP_", "HSA_", "GPU_", "VK_", "VULKAN_",
    "MESA_", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "GGML_", "ZES_", "ONEAPI_",
)


def _allowed_in_child(name: str) -> bool:
    if name == STRIPPED_VARIABLE or name.startswith(STRIPPED_PREFIX):
        return False
    return name in CHILD_ENV_NAMES or name.startswith(CHILD_ENV_PREFIXES)


def describe_exit(exit_code: int | None, signal: int | None) -> str:
    """What an exit status most likely means for llama-server (a signal n counts as 128 + n)."""
    code = exit_code if exit_code is not None else (128 + signal if signal is not None else None)
    known = _EXIT_MEANINGS.get(code) if code is not None else None
    if known is not None:
        return known
    if code is None:
        return "unknown exit status"
    if code > 128:
        return f"killed by signal {code - 128}{_signal_name(code - 128)}"
    return f"exited with code {code}"


#: Runs in the child between fork and exec (Twisted's spawnProcess has no pre-exec hook): its own
#: process group, so a Ctrl-C or a group signal aimed at twistd does not hit llama-server behind the
#: supervisor's back; and SIGTERM when twistd dies, even by SIGKILL, so no orphan keeps the model
#: (and GPU memory) loaded. Then it execs llama-server under the same pid.
_TRAMPOLINE = """\
import os, signal, sys
os.setpgrp()
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
try:
    os.execv(sys.argv[2], sys.argv[2:])
except OSError as e:
    print(f"cannot execute {sys.argv[2]}: {e.strerror}", file=sys.stderr)
    os._exit(127)
"""


def spawn_command(
    executable: str, argv: list[str], python: str = sys.executable, parent_pid: int | None = None
) -> tuple[str, list[str]]:
    """Program and argv that run ``argv`` (argv[0] = program name) through the trampoline."""
    parent = os.getpid() if parent_pid is None else parent_pid
    return python, [python, "-I", "-S", "-c", _TRAMPOLINE, str(parent), executable, *argv[1:]]


def format_exit(exit_code: int | None, signal: int | None, said: str | None = None) -> str:
    """The exit status and why: what the child ``said`` (its first error line) when it said
    something, else the usual meaning of the status, e.g. ``exit code 1: bad model file, …``."""
    if signal is not None:
        status = f"signal {signal}{_signal_name(signal)}"
    elif exit_code is not None:
        status = f"exit code {exit_code}"
    else:
        return said or describe_exit(None, None)
    return f"{status}: {said or describe_exit(exit_code, signal)}"


#: A line of llama-server's output that reports an error (its "E" log level, or the words).
_ERROR_WORDS = re.compile(r"\berror\b|\bfailed\b|\bcannot\b|\bunable\b|\bnot found\b",
                          re.IGNORECASE)
#: llama-server's log prefix: elapsed time and level letter ("0.00.006.760 E ").
_LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ ([EWIDT]) ")


def error_line(line: str) -> str | None:
    """``line`` without llama-server's log prefix if it reports an error, else None."""
    prefix = _LOG_PREFIX.match(line)
    if prefix is not None:
        if prefix.group(1) != "E":
            return None
        line = line[prefix.end():]
    elif not _ERROR_WORDS.search(line):
        return None
    line = line.strip()
    return line[:300] or None


_EXIT_MEANINGS: dict[int, str] = {
    0: "exited normally",
    1: "bad model file, unsupported model, or port already in use",
    127: "binary not found or not executable",
    128 + signal_module.SIGABRT: "aborted (assertion failure)",
    128 + signal_module.SIGKILL: "killed (out of memory, or SIGKILL)",
    128 + signal_module.SIGSEGV: "segmentation fault",
}


def _signal_name(number: int) -> str:
    try:
        return f" ({signal_module.Signals(number).name})"
    except ValueError:
        return ""


def default_key_dir(shm: str = "/dev/shm") -> str:
    """/dev/shm/llama-keys (memory only) when /dev/shm is usable, else one in the temp dir."""
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return os.path.join(shm, "llama-keys")
    return os.path.join(tempfile.gettempdir(), "llama-keys")


def ensure_private_directory(path: str) -> None:
    """Create ``path`` with mode 0700, or check an existing one is ours and make it 0700."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise BackendKeyFileError(f"backend key directory {path} is not a directory")
    if info.st_uid != os.geteuid():
        raise BackendKeyFileError(
            f"backend key directory {path} belongs to uid {info.st_uid}, not to us "
            f"(uid {os.geteuid()}); set BACKEND_KEY_DIR to a directory of our own"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode != 0o700:
        os.chmod(path, 0o700)
        if mode & 0o077:
            log.emit(
                LogLevel.warn,
                "Backend key directory {path} had mode {mode}; changed it to 0700",
                path=path,
                mode=oct(mode),
            )


#: A backend key file's name: instance id, boot, pid of the gateway that owns it, random token.
_KEY_FILE_NAME = re.compile(
    r"\.?backend-(?P<instance>[A-Za-z0-9._-]+)\.(?P<boot>[0-9a-f]{8})\.(?P<pid>[0-9]+)"
    r"\.(?P<token>[0-9a-f]{12})\.key(?:\.[0-9a-f]{12}\.tmp)?"
)


def boot_id(path: str = "/proc/sys/kernel/random/boot_id") -> str:
    """8 hex digits naming this boot of the machine ("00000000" where the kernel does not say)."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip().replace("-", "")[:8].lower() or "00000000"
    except OSError:
        return "00000000"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists (another user's): not ours to judge
    return True


class BackendKeyFile:
    """The per-boot key of a supervised llama-server, in a 0600 file only we can read.

    The file's name is this process's own (``backend-INSTANCE.BOOT.PID.TOKEN.key``, the token
    random): two gateways on one host, even with the same INSTANCE_ID, never write, overwrite or
    delete each other's file. Files left by gateways that died (their pid is gone, or they are
    from an earlier boot) are wiped and removed when a new one is written.

    The key is generated when the object is made (so the gateway can use it before the file is
    written); ``write()`` creates the file atomically and ``delete()`` wipes and removes it.
    ``repr()`` shows the path and the key's 8-character prefix, never the key.
    """

    def __init__(
        self,
        directory: str | None = None,
        instance_id: str = "default",
        key: str | None = None,
        *,
        pid: int | None = None,
        boot: str | None = None,
        alive: Callable[[int], bool] = _process_alive,
    ) -> None:
        self.directory = directory or default_key_dir()
        self.pid = os.getpid() if pid is None else pid
        self.boot = boot_id() if boot is None else boot
        self._alive = alive
        name = (f"backend-{sanitize_instance_id(instance_id)}.{self.boot}.{self.pid}"
                f".{secrets.token_hex(6)}.key")
        self.path = os.path.join(self.directory, name)
        self.key = key if key is not None else KEY_PREFIX + secrets.token_urlsafe(32)
        self.written = False

    @classmethod
    def from_config(cls, config: Config) -> BackendKeyFile:
        """A fresh key for this boot, in ``config.key_dir`` (or the default directory)."""
        return cls(config.key_dir, config.instance_id)

    @property
    def prefix(self) -> str:
        """The first 8 characters of the key: the most that may appear in logs."""
        return self.key[:8]

    def __repr__(self) -> str:
        return f"<BackendKeyFile path={self.path!r} prefix={self.prefix!r}>"

    def exists(self) -> bool:
        """True while the file is in place (something outside may have removed it)."""
        return os.path.lexists(self.path)

    def write(self) -> None:
        """Create the directory (0700) and the key file (0600), atomically, and check the mode.

        The file is linked into place, never renamed over an existing name: nothing that is
        not this object's own file can be replaced.
        """
        ensure_private_directory(self.directory)
        self.remove_stale()
        temporary = f"{self.path}.{secrets.token_hex(6)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)
                _write_all(fd, (self.key + "\n").encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                if self.written or self.exists():  # our own, rewritten (e.g. removed by hand)
                    _wipe(self.path)
            os.link(temporary, self.path)
        finally:
            _unlink_quietly(temporary)
        _fsync_directory(self.directory)
        info = os.lstat(self.path)
        if not stat.S_ISREG(info.st_mode) or stat.S_IMODE(info.st_mode) != 0o600:
            raise BackendKeyFileError(
                f"backend key file {self.path} has mode {oct(stat.S_IMODE(info.st_mode))} "
                "after writing, expected 0600"
            )
        self.written = True
        log.info(
            "Backend key file written: {path} (key {key_prefix}…)",
            path=self.path,
            key_prefix=self.prefix,
        )

    def remove_stale(self) -> list[str]:
        """Wipe and remove key files of gateways that are gone; returns their paths.

        Only our uid's regular files with a key file's name, whose gateway ran in an earlier
        boot or whose pid no longer exists in this boot. A live pid keeps its file, whoever it is.
        """
        removed: list[str] = []
        try:
            names = os.listdir(self.directory)
        except OSError:
            return removed
        for name in names:
            match = _KEY_FILE_NAME.fullmatch(name)
            path = os.path.join(self.directory, name)
            if match is None or path == self.path:
                continue
            pid = int(match["pid"])
            if match["boot"] == self.boot and (pid == self.pid or self._alive(pid)):
                continue
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                continue
            with contextlib.suppress(OSError):
                _wipe(path)
                removed.append(path)
        if removed:
            log.info("Removed {count} backend key file(s) of gateways that are gone: {paths}",
                     count=len(removed), paths=", ".join(removed))
        return removed

    def delete(self) -> None:
        """Overwrite the file with zeros and remove it; a missing file is not an error."""
        self.written = False
        _wipe(self.path)


def _wipe(path: str) -> None:
    """Overwrite ``path`` with zeros and remove it (a symlink is only removed)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError:
        pass  # e.g. a symlink put in its place: just remove the name
    else:
        try:
            size = os.fstat(fd).st_size
            _write_all(fd, b"\0" * size)
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _fsync_directory(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
