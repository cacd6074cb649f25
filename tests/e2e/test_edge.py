"""Issue 16, the process edge, with the real twistd and llama-server: key files of two instances,
a child that cannot start, and what a child inherits."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import httpx
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.harness import API_KEY, Gateway, free_port, tiny_model, wait_for


def _chat(gateway: Gateway) -> int:
    return httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=60,
    ).status_code


class KeyFileTests(SynchronousTestCase):
    def test_two_instances_with_one_instance_id_leave_each_other_alone(self) -> None:
        """As observed: the second instance overwrote and then deleted the first's key file,
        and the first one's restarted child failed in a loop."""
        shared = tempfile.mkdtemp(prefix="llamaproxy-keys-")
        keys = os.path.join(shared, "keys")
        env = {"INSTANCE_ID": "vm", "BACKEND_KEY_DIR": keys}
        first = Gateway(env).start()
        self.addCleanup(first.stop)
        second = Gateway(env).start()
        self.assertEqual(len(os.listdir(keys)), 2)
        self.assertEqual(second.stop(), 0)
        self.assertEqual(len(os.listdir(keys)), 1)
        # The first instance's child restarts and still finds its key.
        os.kill(first.child_pid(), signal.SIGKILL)
        wait_for(lambda: first.health()["backend"]["restarts"] == 1,  # type: ignore[index]
                 30, "the restart")
        first.wait_ready(60)
        self.assertEqual(_chat(first), 200)
        self.assertIn("SIGKILL", str(first.health()["backend"]))


class ChildStartTests(SynchronousTestCase):
    def test_a_child_that_cannot_start_says_why_in_health(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="llamaproxy-bad-model-"))
        bad = root / "bad.gguf"
        bad.write_bytes(b"this is not a GGUF file\n")
        gateway = Gateway({"MODEL_PATH": str(bad)}).start(wait_ready=False)
        self.addCleanup(gateway.stop)

        def said() -> bool:
            try:
                backend = gateway.health()["backend"]
            except httpx.TransportError:
                return False
            return bool(backend["last_exit"])  # type: ignore[index]

        wait_for(said, 60, "the child's first exit")
        last_exit = str(gateway.health()["backend"]["last_exit"])  # type: ignore[index]
        # llama-server's own words, not a guess from the exit code.
        self.assertIn("invalid magic characters", last_exit)
        self.assertNotIn("port already in use", last_exit)


class ChildEnvironmentTests(SynchronousTestCase):
    def test_api_key_env_secret_does_not_reach_the_child(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="llamaproxy-env-"))
        config = root / "backends.toml"
        config.write_text(f"""
[[backends]]
name = "local"
model_path = "{tiny_model()}"
models = ["tiny"]
port = {free_port()}
ctx = 2048
threads = 1
parallel = 1
child_env = {{ CHILD_ONLY = "given" }}

[[backends]]
name = "upstream"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "UPSTREAM_SECRET"
models = ["other"]
""")
        gateway = Gateway({"LLAMAPROXY_CONFIG": str(config),
                           "UPSTREAM_SECRET": "sk-upstream-must-not-leak",
                           "AWS_SECRET_ACCESS_KEY": "cloud-secret"}).start()
        self.addCleanup(gateway.stop)
        environ = Path(f"/proc/{gateway.child_pid()}/environ").read_bytes()
        names = {entry.split(b"=", 1)[0] for entry in environ.split(b"\0") if entry}
        self.assertNotIn(b"sk-upstream-must-not-leak", environ)
        self.assertNotIn(b"UPSTREAM_SECRET", names)
        self.assertNotIn(b"AWS_SECRET_ACCESS_KEY", names)
        self.assertIn(b"CHILD_ONLY=given", environ.split(b"\0"))
        self.assertIn(b"PATH", names)
