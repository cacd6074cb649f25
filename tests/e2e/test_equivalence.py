"""Through the gateway a client gets what llama-server sends (issue 16.1).

The same requests go to the real llama-server directly (the gateway's own child, with its per-boot
key) and through the gateway; the parsed answers must be equal apart from ids, creation times and
timing values. Observed before: a stream that did not ask for usage lost its ``timings`` chunk
through the gateway, which had forced ``include_usage`` and then deleted the usage event.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.harness import API_KEY, shared_gateway

MESSAGES = [{"role": "user", "content": "Tell me something"}]
BASE = {"max_tokens": 6, "temperature": 0, "seed": 7}

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "chat stream": ("/v1/chat/completions", {"messages": MESSAGES, "stream": True}),
    "chat stream, include_usage": ("/v1/chat/completions", {
        "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}),
    "chat stream, include_usage false": ("/v1/chat/completions", {
        "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": False}}),
    "chat": ("/v1/chat/completions", {"messages": MESSAGES}),
    "legacy completion stream": ("/v1/completions", {"prompt": "Once upon", "stream": True}),
    "legacy completion": ("/v1/completions", {"prompt": "Once upon"}),
}

#: Values that differ between any two runs (or with the prompt cache's state): compared by key.
_VOLATILE = {"id", "created", "timings", "prompt_tokens_details"}


def normalized(value: Any) -> Any:
    """``value`` with volatile fields replaced by their key sets (timings: which keys, not
    how long)."""
    if isinstance(value, dict):
        return {k: sorted(v) if k in _VOLATILE and isinstance(v, dict) else
                ("<volatile>" if k in _VOLATILE else normalized(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    return value


def answer(url: str, key: str, path: str, body: dict[str, Any]) -> tuple[str, list[Any]]:
    response = httpx.post(f"{url}{path}", json={**BASE, **body}, timeout=60,
                          headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, (url, response.status_code, response.text)
    content_type = response.headers["content-type"].split(";")[0]
    if content_type != "text/event-stream":
        return content_type, [normalized(response.json())]
    events = []
    for event in response.text.split("\n\n"):
        if not event.strip():
            continue
        assert event.startswith("data: "), event
        data = event[len("data: "):]
        events.append(data if data == "[DONE]" else normalized(json.loads(data)))
    return content_type, events


class EquivalenceTests(SynchronousTestCase):
    def test_the_gateway_relays_what_llama_server_sends(self) -> None:
        gateway = shared_gateway()
        backend_key = gateway.backend_key()
        for name, (path, body) in CASES.items():
            direct = answer(gateway.backend_url, backend_key, path, body)
            through = answer(gateway.url, API_KEY, path, body)
            self.assertEqual(through, direct, name)
            if name == "chat stream":  # the observed defect: its last chunk had timings
                [last] = [e for e in through[1] if isinstance(e, dict) and "timings" in e]
                self.assertEqual(last["choices"][0]["finish_reason"], "length")
