"""What the gateway reads from an API request's JSON body, and the little it ever changes in it.

The body is checked once, when it is complete: its shape first (``JsonShape`` measured it while it
arrived: too deep or too many items is a 400 before anything is parsed), then ``json.loads`` (as
``tokens.parse_json`` does it), then what the route needs (``messages``, ``prompt``, ``input``).
What routing and accounting need is kept as ``BodyFacts`` (a few small fields); the parsed tree is
dropped at once, so a request waiting in the queue holds its bytes and nothing bigger. The bytes
go to the backend as they came, unless several backends know the model by different names: then
``with_model`` parses them again to put in the upstream's name.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from llamaproxy.backends.affinity import PrefixRule, prefix_hash
from llamaproxy.gateway import errors
from llamaproxy.gateway.errors import GatewayError
from llamaproxy.gateway.json_shape import JsonShape
from llamaproxy.gateway.tokens import parse_json

#: What each OpenAI route needs in its JSON body (llama-server answers a 500 otherwise).
REQUIRED_FIELD = {
    b"/v1/chat/completions": "messages",
    b"/v1/completions": "prompt",
    b"/v1/embeddings": "input",
}

#: Longest ``model`` string kept (a longer one cannot name a model: it is refused as unknown).
MAX_MODEL_NAME = 256


class BodyFacts(NamedTuple):
    """What the gateway needs from a request body, without the body's object tree.

    (Immutable; a NamedTuple rather than a frozen dataclass, whose field-by-field
    ``object.__setattr__`` made one per request cost about 7 200 instructions.)
    """

    #: The ``model`` field as sent (None when absent); not yet resolved to a known model.
    model: str | None = None
    #: ``"stream": true``.
    stream: bool = False
    #: Hash of the conversation's leading part (``llamaproxy.backends.affinity.prefix_hash``), when
    #: some
    #: model routes by prefix and the prompt is long enough to have a reusable one.
    prefix_hash: int | None = None


#: Facts of a request without a JSON body (GET, HEAD).
NO_FACTS = BodyFacts()


def invalid_json(message: str) -> GatewayError:
    """400 ``invalid_json`` (the older gateway's code for a body that is not usable JSON)."""
    return errors.bad_request(message, code="invalid_json")


def read_facts(
    path: bytes, raw: bytes, shape: JsonShape | None, prefix_rule: PrefixRule | None = None
) -> BodyFacts | GatewayError:
    """Check ``raw`` (a POST body for ``path``) and return its facts, or the 400 to answer.

    With ``prefix_rule`` (some model uses ``cache_affinity``), chat and completion bodies get
    their ``prefix_hash`` (work bounded by the rule's lengths).
    """
    if shape is not None and shape.error is not None:
        return invalid_json(f"Request body refused: {shape.error}")
    body = parse_object(raw)
    if isinstance(body, GatewayError):
        return body
    required = REQUIRED_FIELD.get(path)
    if required is not None and required not in body:
        return errors.bad_request(
            f"'{required}' is a required property", code="missing_required_parameter",
            param=required,
        )
    if required == "messages" and not isinstance(body["messages"], list):
        return errors.bad_request(
            "'messages' must be an array", code="invalid_type", param="messages"
        )
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        return errors.bad_request("'model' must be a string", code="invalid_type", param="model")
    if model is not None and len(model) > MAX_MODEL_NAME:
        model = model[:MAX_MODEL_NAME] + "…"
    prefix = None
    if prefix_rule is not None and required != "input" and required is not None:
        prefix = prefix_hash(body, prefix_rule)
    return BodyFacts(model, body.get("stream") is True, prefix)


def parse_object(raw: bytes) -> dict[str, Any] | GatewayError:
    """``raw`` as a JSON object, or the 400 to answer (never an exception)."""
    try:
        body = parse_json(raw)
    except (ValueError, UnicodeDecodeError):
        return invalid_json("Request body is not valid JSON")
    except RecursionError:  # (JsonShape refuses such bodies first; this is the last guard)
        return invalid_json("Request body refused: JSON nests too deeply")
    if not isinstance(body, dict):
        return invalid_json("Request body must be a JSON object")
    return body


def with_model(raw: bytes, model: str) -> bytes:
    """``raw`` with its ``model`` set to ``model`` (the body was checked by ``read_facts``)."""
    body = json.loads(raw)
    body["model"] = model
    return json.dumps(body).encode()


def with_slot(raw: bytes, slot: int) -> bytes:
    """``raw`` with ``id_slot`` set to ``slot`` (``[affinity] pin_slot``)."""
    body = json.loads(raw)
    body["id_slot"] = slot
    return json.dumps(body).encode()
