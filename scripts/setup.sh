#!/usr/bin/env bash
# Set up everything llamaproxy needs, idempotently: system build tools (if missing), a virtualenv in
# .venv with llamaproxy and its test tools, and a cached llama-server build (scripts/build-llama-server.sh).
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${LLAMAPROXY_VENV:-.venv}"

need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v c++ >/dev/null || need_apt+=(g++)
command -v make >/dev/null || command -v ninja >/dev/null || need_apt+=(make)
"$PYTHON" -c "import venv, ensurepip" 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing build tools: ${need_apt[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "Missing: ${need_apt[*]} (install them, e.g. sudo apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
fi

# What only the tests need (scripts/test.sh sets LLAMAPROXY_SETUP_FOR_TESTS=1; the quick start
# does not, so running the gateway never installs a browser or a Redis server):
#
# The operator page's browser tests (tests/e2e/test_operator_page.py) drive Debian's chromium
# through chromium-driver (never a browser downloaded at run time). Installed when missing and we
# are root; otherwise those tests are skipped, which LLAMAPROXY_REQUIRE_E2E=1 (CI) turns into a
# failure.
for_tests="${LLAMAPROXY_SETUP_FOR_TESTS:-0}"
if [ "$for_tests" = 1 ] && { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing chromium and chromium-driver (browser tests of the operator page)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        chromium chromium-driver >/dev/null; } \
      || echo "Could not install chromium/chromium-driver: the browser tests will not run" >&2
  else
    echo "chromium and chromium-driver are missing and this is not root: the operator page's" \
      "browser tests will be skipped (sudo apt-get install chromium chromium-driver)" >&2
  fi
fi

# The shared-state tests (tests/state, tests/e2e/test_replicas.py) start Debian's redis-server on
# a loopback port. Installed when missing and we are root; otherwise they are skipped, which
# LLAMAPROXY_REQUIRE_E2E=1 (CI) turns into a failure.
if [ "$for_tests" = 1 ] && ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing redis-server (tests of the state shared by replicas)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        redis-server >/dev/null; } \
      || echo "Could not install redis-server: the shared-state tests will not run" >&2
  else
    echo "redis-server is missing and this is not root: the shared-state tests will be" \
      "skipped (sudo apt-get install redis-server)" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "Creating virtualenv $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.llamaproxy-installed"
want="$(cat setup.py | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VENV/bin/python" -c "import llamaproxy" 2>/dev/null; then
  echo "Installing llamaproxy and its test tools into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
  # compat mode: PEP 660 editable installs hide twisted/plugins from twistd.
  "$VENV/bin/python" -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
  echo "$want" > "$stamp"
fi
# Refresh twistd's plugin cache (dropin.cache, git-ignored) so `twistd --help` lists llamaproxy.
"$VENV/bin/python" -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" 2>/dev/null || true

PYTHON="$VENV/bin/python" bash scripts/build-llama-server.sh
