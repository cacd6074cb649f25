"""The README's "generate a key, then curl with it", back to back, on the real twistd (16.12).

The key file used to be polled every 5 s, so a request made right after ``llamaproxy keys
generate`` got 401 for about 2 s. Now the gateway hears of the change through inotify.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
from twisted.trial.unittest import TestCase

from tests.e2e.harness import Gateway, free_port
from tests.e2e.test_unreachable import CHAT, fake_backend

ROUNDS = 10


class KeyPickupTests(TestCase):
    def test_a_new_key_works_at_once(self) -> None:
        port = free_port()
        backend = fake_backend(port)
        self.addCleanup(lambda: backend.poll() is None and backend.kill())
        gw = Gateway(env={"BACKEND_URL": f"http://127.0.0.1:{port}",
                          # polling alone would not see it in time
                          "KEYS_RELOAD_INTERVAL": "30"})
        self.addCleanup(gw.stop)
        gw.start()
        cli = str(Path(sys.executable).parent / "llamaproxy")
        for n in range(ROUNDS):
            key = subprocess.run(
                [cli, "keys", "--file", str(gw.keys_file), "-q", "generate", "--name", f"k{n}"],
                check=True, capture_output=True, text=True,
            ).stdout.strip()
            response = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, timeout=30,
                                  headers={"Authorization": f"Bearer {key}"})
            self.assertEqual(response.status_code, 200, (n, response.text))
