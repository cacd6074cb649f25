#!/usr/bin/env bash
# Build the container images (docker/Dockerfile, docker/Dockerfile.gateway) and run them for real:
# the checks of docs/containers.md, each printed as PASS or FAIL, then one summary line; the exit
# status is 0 only when every check passed. scripts/test.sh runs this as its slow group.
#
# Needs root (or a running Docker daemon). When no daemon answers, it installs docker.io (apt) if
# needed, starts dockerd in the background, and stops that daemon (by its pid) at the end. When no
# debian:bookworm-slim image exists (no registry access), it makes one with debootstrap from the
# machine's Debian mirror, so the Dockerfiles stay the ordinary ones. Images and the BuildKit cache
# (llama-server's build included) stay in the daemon's storage: later runs rebuild in seconds.
#
#   LLAMAPROXY_BUILD_CA    CA bundle passed as the build secret "ca" (default: the host's
#                          /etc/ssl/certs/ca-certificates.crt when it exists; "none" for none)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL   passed to the builder as build args when http(s)
#   LLAMAPROXY_DOCKER_KEEP_DAEMON=1      leave a daemon this script started running
set -euo pipefail
cd "$(dirname "$0")/.."
started_at=$SECONDS
VENV="${LLAMAPROXY_VENV:-.venv}"
PY="$PWD/$VENV/bin/python"
[ -x "$PY" ] || PY=python3
RUN_ID="lp-test-$$"
work="$(mktemp -d /tmp/llamaproxy-docker.XXXXXX)"
dockerd_pid=""
prometheus_pid=""
passed=0
failed=0
failures=()

log() { echo "-- $*" >&2; }
pass() { passed=$((passed + 1)); echo "PASS: $1"; }
fail() { failed=$((failed + 1)); failures+=("$1"); echo "FAIL: $1${2:+ ($2)}"; }
# check NAME COMMAND...: run the command, PASS when it exits 0.
check() {
  local name="$1"; shift
  if "$@" > "$work/check.out" 2>&1; then
    sed 's/^/    /' "$work/check.out"; pass "$name"
  else
    sed 's/^/    /' "$work/check.out" | tail -n 30; fail "$name"
  fi
}

summary=""  # set once the checks ran (or the images did not build); cleanup prints the last line
cleanup() {
  local status=$?
  set +e
  [ -z "$prometheus_pid" ] || { kill -TERM "$prometheus_pid"; wait "$prometheus_pid"; } 2>/dev/null
  if docker info >/dev/null 2>&1; then
    ids="$(docker ps -aq --filter "label=$RUN_ID")"
    [ -n "$ids" ] && docker rm -f $ids >/dev/null 2>&1
    docker network rm "$RUN_ID" >/dev/null 2>&1
  fi
  if [ -n "$dockerd_pid" ] && [ "${LLAMAPROXY_DOCKER_KEEP_DAEMON:-0}" != 1 ]; then
    log "stopping the dockerd this script started (pid $dockerd_pid)"
    kill -TERM "$dockerd_pid" 2>/dev/null
    for _ in $(seq 1 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$dockerd_pid" 2>/dev/null && { log "dockerd did not stop: SIGKILL"; kill -KILL "$dockerd_pid"; }
  fi
  rm -rf "$work"
  local elapsed=$((SECONDS - started_at))
  if [ -z "$summary" ]; then
    summary="aborted (exit status $status)"
    failed=$((failed + 1))
  fi
  if [ "$failed" = 0 ] && [ "$status" = 0 ]; then
    echo "containers: $passed passed, 0 failed in ${elapsed} s: PASSED"
  else
    local why=""
    [ "$summary" = done ] || why=" ($summary)"
    echo "containers: $passed passed, $failed failed in ${elapsed} s: FAILED${failures[*]:+: $(IFS=';'; echo "${failures[*]}")}$why"
    [ "$status" != 0 ] || status=1
  fi
  exit "$status"
}
trap cleanup EXIT

# --- the daemon ------------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "FAIL: no Docker daemon and not root (cannot start one)"; exit 1; }
    log "installing docker.io"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
  fi
  log "starting dockerd (log: $work/dockerd.log)"
  dockerd --storage-driver=overlay2 > "$work/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { tail -n 20 "$work/dockerd.log"; echo "FAIL: dockerd did not start"; exit 1; }
fi

# The build client: `docker build` needs BuildKit (RUN --mount, --secret). A client with the buildx
# plugin does that; without it, the docker.io client's built-in BuildKit mode (DOCKER_BUILDKIT=1).
build_client=(docker)
if ! docker buildx version >/dev/null 2>&1; then
  for candidate in /usr/bin/docker $(type -a -P docker 2>/dev/null); do
    if DOCKER_BUILDKIT=1 "$candidate" build --help 2>/dev/null | grep -q -- '--secret'; then
      build_client=(env DOCKER_BUILDKIT=1 "$candidate"); break
    fi
  done
fi

# --- the base image --------------------------------------------------------------------------
debian_mirror() {
  local uri
  uri="$(grep -hoE '^(deb|URIs:)[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
           /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
         | grep -oE 'https?://[^[:space:]]+' | head -n1 || true)"
  echo "${uri:-http://deb.debian.org/debian}"
}
if ! docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || {
    log "installing debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  mirror="$(debian_mirror)"
  log "no debian:bookworm-slim image: debootstrap --variant=minbase bookworm from $mirror"
  t0=$SECONDS
  rootfs="$work/rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log"; echo "FAIL: debootstrap"; exit 1; }
  # What the official slim image leaves out: docs, man pages, locales, apt lists and caches.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log
  mkdir -p "$rootfs/etc/dpkg/dpkg.cfg.d"
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
    'path-exclude /usr/share/man/*' 'path-exclude /usr/share/groff/*' 'path-exclude /usr/share/info/*' \
    'path-exclude /usr/share/lintian/*' 'path-exclude /usr/share/locale/*' \
    > "$rootfs/etc/dpkg/dpkg.cfg.d/docker"
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s-security bookworm-security main\n' \
    "$mirror" "$mirror" "$mirror" > "$rootfs/etc/apt/sources.list"
  tar -C "$rootfs" -c . | docker import -c 'CMD ["bash"]' - debian:bookworm-slim >/dev/null
  rm -rf "$rootfs"
  log "debian:bookworm-slim imported in $((SECONDS - t0)) s"
fi

# --- build -----------------------------------------------------------------------------------
build_args=()
ca="${LLAMAPROXY_BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}"
if [ "$ca" != none ] && [ -s "$ca" ]; then build_args+=(--secret "id=ca,src=$ca"); fi
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
  value="${!var:-}"
  # Only URLs the builder can reach: a file:// index on this host does not exist in the build.
  kept="$(for u in $value; do case "$u" in http://*|https://*) printf '%s ' "$u";; esac; done)"
  [ -n "$kept" ] && build_args+=(--build-arg "$var=${kept% }")
done
build() {  # build TAG DOCKERFILE [BUILD OPTION...]
  local t0=$SECONDS old new tag="$1" file="$2"
  shift 2
  old="$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)"
  if "${build_client[@]}" build --progress=plain "${build_args[@]}" "$@" -f "$file" -t "$tag" . \
      > "$work/build-$tag.log" 2>&1; then
    echo "    built $tag from $file${*:+ ($*)} in $((SECONDS - t0)) s"
    # The image this tag named before is garbage now: remove it (the build cache stays).
    new="$(docker image inspect -f '{{.Id}}' "$tag")"
    if [ -n "$old" ] && [ "$old" != "$new" ]; then docker rmi "$old" >/dev/null 2>&1 || true; fi
  else
    tail -n 40 "$work/build-$tag.log" | sed 's/^/    /'
    return 1
  fi
}
size_mb() { docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.0f", $1 / 1000000}'; }

echo "== containers: build"
check "build llamaproxy:cpu (docker/Dockerfile)" build llamaproxy:cpu docker/Dockerfile
check "build llamaproxy:gateway (docker/Dockerfile.gateway)" build llamaproxy:gateway docker/Dockerfile.gateway
if ! docker image inspect llamaproxy:cpu >/dev/null 2>&1 || ! docker image inspect llamaproxy:gateway >/dev/null 2>&1; then
  summary="images did not build"
  exit 1
fi
echo "    sizes: llamaproxy:cpu $(size_mb llamaproxy:cpu) MB, llamaproxy:gateway $(size_mb llamaproxy:gateway) MB"
# Measured 112 MB and 94 MB (docs/containers.md, "Image sizes"): the final stages are only the files
# docker/slim-rootfs.sh keeps. These guard against growth, a few MB above the measured sizes.
check "llamaproxy:cpu at most 118 MB" test "$(size_mb llamaproxy:cpu)" -le 118
check "llamaproxy:gateway at most 100 MB" test "$(size_mb llamaproxy:gateway)" -le 100
# ROOTFS=base keeps the whole base image, as a CUDA build must (not testable here): it builds from
# the same stages and runs.
base_image_runs() {
  build llamaproxy:cpu-base docker/Dockerfile --build-arg ROOTFS=base || return 1
  docker run --rm --label "$RUN_ID" llamaproxy:cpu-base --help > "$work/help-base.txt" 2>&1
  grep -q -- '--backend-url' "$work/help-base.txt" \
    && echo "    llamaproxy:cpu-base $(size_mb llamaproxy:cpu-base) MB; --help prints the options"
}
check "build and run llamaproxy:cpu-base (docker/Dockerfile, ROOTFS=base)" base_image_runs

# --- what the images contain ----------------------------------------------------------------
contents() {  # contents IMAGE: no toolchain, no pip, no tests, caches or build leftovers
  docker run --rm --label "$RUN_ID" --entrypoint /bin/sh "$1" -c '
    bad=0
    for tool in gcc g++ cc c++ cmake make ld as ninja pip pip3 git apt apt-get dpkg perl bash; do
      if command -v "$tool" >/dev/null; then echo "toolchain or package manager: $(command -v "$tool")"; bad=1; fi
    done
    for path in /src /wheels /out /cache /root/.cache /opt/venv/bin/pip /usr/include/c++; do
      if [ -e "$path" ]; then echo "leftover: $path"; bad=1; fi
    done
    found="$(find / -xdev \( -name "*.gguf" -o -name "*.whl" -o -name "*.deb" -o -name CMakeCache.txt \
      -o -path "*/site-packages/tests" -o -path "/var/lib/apt/lists/*" \
      -o -name ".coverage*" -o -name "_trial_temp*" -o -name ".git" \) -not -path "/proc/*" 2>/dev/null)"
    [ -z "$found" ] || { echo "test or cache files:"; echo "$found"; bad=1; }
    ls /opt/venv/lib/python3*/site-packages/twisted/plugins/dropin.cache >/dev/null || { echo "no dropin.cache"; bad=1; }
    /opt/venv/bin/python -c "from twisted.internet import inotify" || { echo "no inotify (ctypes finds no libc)"; bad=1; }
    [ "$bad" = 0 ] && echo "no toolchain, no apt, dpkg, perl or pip, no test, cache or build files; dropin.cache present, inotify loads"
    exit "$bad"'
}

echo "== containers: image contents"
check "llamaproxy:cpu has no build toolchain, test or cache files" contents llamaproxy:cpu
check "llamaproxy:gateway has no build toolchain, test or cache files" contents llamaproxy:gateway
help_lists_options() {
  docker run --rm --label "$RUN_ID" "$1" --help > "$work/help.txt" 2>&1 || true
  grep -E -- '--drain-timeout|--backend-url|--model ' "$work/help.txt" | head -n 3
  grep -q -- '--drain-timeout' "$work/help.txt" && grep -q -- '--backend-url' "$work/help.txt"
}
check "docker run llamaproxy:cpu --help prints the options" help_lists_options llamaproxy:cpu

# --- the CPU image, serving the tiny model ---------------------------------------------------
# The client side (tests/containers/client.py) and the tiny model need httpx and gguf: the project's
# .venv has them (scripts/setup.sh); without it, a throwaway venv with just those.
if ! "$PY" -c "import httpx, gguf" 2>/dev/null; then
  log "no $VENV with httpx and gguf: a throwaway venv for the client"
  python3 -m venv "$work/venv" && "$work/venv/bin/pip" install --quiet httpx gguf > "$work/pip.log" 2>&1 \
    || { tail -n 20 "$work/pip.log"; exit 1; }
  PY="$work/venv/bin/python"
fi
mkdir -p "$work/models"
"$PY" -c "import sys; sys.path.insert(0, 'tests/e2e'); from tiny_model import write_tiny_model; \
write_tiny_model('$work/models/tiny.gguf')"
chmod -R a+rX "$work"
port_of() { docker port "$1" "$2" | head -n1 | sed 's/.*://'; }
ip_of() { docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' "$1" | awk '{print $1}'; }
docker network create --label "$RUN_ID" "$RUN_ID" >/dev/null

cpu="$RUN_ID-cpu"
echo "== containers: llamaproxy:cpu (read-only root, tiny model, DRAIN_TIMEOUT=20)"
docker run -d --name "$cpu" --label "$RUN_ID" --network "$RUN_ID" --read-only --tmpfs /tmp \
  --stop-timeout 60 -p 127.0.0.1::8000 -p 127.0.0.1::8001 -v "$work/models:/data/models:ro" \
  -e MODEL_NAME=tiny.gguf -e MODEL_ALIAS=tiny -e CTX=4096 -e PARALLEL=2 -e DRAIN_TIMEOUT=20 \
  -e KEYS_RELOAD_INTERVAL=1 llamaproxy:cpu >/dev/null
url="http://127.0.0.1:$(port_of "$cpu" 8000)"
health_url="http://127.0.0.1:$(port_of "$cpu" 8001)"
direct="http://$(ip_of "$cpu"):8000"
failed_before=$failed
check "llamaproxy:cpu turns ready (llama-server loaded the model)" "$PY" tests/containers/client.py wait-ready "$url" 120
[ "$failed" = "$failed_before" ] || docker logs "$cpu" 2>&1 | tail -n 30 | sed 's/^/    /'

# The documented way to make a key: `llamaproxy keys` in the container, into the /data volume.
key="$(docker exec "$cpu" llamaproxy keys --file /data/api_keys.txt -q generate --name docker 2>&1 || true)"
echo "    key made with: docker exec $cpu llamaproxy keys --file /data/api_keys.txt -q generate --name docker"
sleep 2  # KEYS_RELOAD_INTERVAL=1: the running gateway picks the new key up by itself
check "no key: 401 OpenAI-shaped" "$PY" tests/containers/client.py unauthorized "$url"
check "streamed chat completion with a key through the gateway" "$PY" tests/containers/client.py stream "$url" "$key"

runs_as_non_root() {
  local uids
  uids="$(docker exec "$cpu" sh -c 'for s in /proc/[0-9]*/status; do
    printf "%s uid=%s\n" "$(sed -n "s/^Name:[[:space:]]*//p" "$s")" "$(sed -n "s/^Uid:[[:space:]]*\([0-9]*\).*/\1/p" "$s")"; done')"
  echo "$uids"
  echo "$uids" | grep -q '^llama-server uid=10001$' || { echo "no llama-server running as 10001"; return 1; }
  ! echo "$uids" | grep -v 'uid=10001$' | grep -q .
}
check "every process in the container runs as uid 10001 (llama-server included)" runs_as_non_root
read_only_root() {
  [ "$(docker inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$cpu")" = true ] || return 1
  if docker exec "$cpu" sh -c 'touch /opt/venv/probe' 2>"$work/ro.err"; then echo "root is writable"; return 1; fi
  cat "$work/ro.err"
  docker exec "$cpu" sh -c 'touch /data/probe /tmp/probe && rm /data/probe /tmp/probe' && echo "/data and /tmp writable"
}
check "read-only root filesystem: / refuses writes, /data and /tmp take them" read_only_root
healthy() {
  local status=""
  for _ in $(seq 1 60); do
    status="$(docker inspect -f '{{.State.Health.Status}}' "$cpu")"
    [ "$status" = healthy ] && { echo "health: $status"; return 0; }
    sleep 1
  done
  echo "health: $status"; docker inspect -f '{{json .State.Health}}' "$cpu"; return 1
}
check "HEALTHCHECK turns healthy" healthy
# PID 1: orphans of `docker exec` processes are re-parented to PID 1, which must reap them.
no_zombies() {
  docker exec "$cpu" sh -c 'sleep 1 & exit 0'
  sleep 3
  local zombies
  zombies="$(docker exec "$cpu" sh -c 'grep -l "^State:[[:space:]]*Z" /proc/[0-9]*/status 2>/dev/null || true')"
  echo "PID 1: $(docker exec "$cpu" sed -n 's/^Name:[[:space:]]*//p' /proc/1/status); zombies: ${zombies:-none}"
  [ -z "$zombies" ]
}
check "orphaned processes are reaped (no zombies)" no_zombies
# The compose stack's Prometheus config and the Grafana dashboard, on a real Prometheus (Debian's
# package; the prom/prometheus and grafana images cannot be pulled here) scraping this container.
dashboard_on_prometheus() {
  if ! command -v prometheus >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "no prometheus binary (apt-get install prometheus)"; return 1; }
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
  local config="$work/prometheus.yml" prom_port
  sed -e "s|\"llamaproxy:8000\"|\"127.0.0.1:${url##*:}\"|" -e 's|scrape_interval: 10s|scrape_interval: 1s|' \
    docker/prometheus/prometheus.yml > "$config"
  grep -q "127.0.0.1:${url##*:}" "$config" || { echo "no llamaproxy:8000 target in docker/prometheus/prometheus.yml"; return 1; }
  prom_port="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  prometheus --config.file="$config" --storage.tsdb.path="$work/prometheus" \
    --web.listen-address="127.0.0.1:$prom_port" > "$work/prometheus.log" 2>&1 &
  prometheus_pid=$!
  local status=0
  "$PY" tests/containers/client.py dashboard "http://127.0.0.1:$prom_port" \
    docker/grafana/dashboards/llamaproxy.json || status=1
  kill -TERM "$prometheus_pid"; wait "$prometheus_pid" 2>/dev/null; prometheus_pid=""
  [ "$status" = 0 ] || tail -n 5 "$work/prometheus.log"
  return "$status"
}
check "Prometheus (docker/prometheus/prometheus.yml) scrapes the gateway; every dashboard query runs" dashboard_on_prometheus
stop_drains() {
  "$PY" tests/containers/client.py drain "$direct" "$health_url" "$key" "$cpu" 20 docker || return 1
  local code
  code="$(docker inspect -f '{{.State.ExitCode}}' "$cpu")"
  echo "exit code $code"
  [ "$code" = 0 ]
}
check "docker stop during a stream: the stream finishes, exit 0 within DRAIN_TIMEOUT" stop_drains

# --- the gateway-only image in front of llama-server in another container --------------------
echo "== containers: llamaproxy:gateway -> llama-server in another container"
llama="$RUN_ID-llama"
docker run -d --name "$llama" --label "$RUN_ID" --network "$RUN_ID" --read-only \
  -v "$work/models:/models:ro" --entrypoint llama-server llamaproxy:cpu \
  -m /models/tiny.gguf --host 0.0.0.0 --port 8080 -c 2048 --alias tiny >/dev/null
gw="$RUN_ID-gateway"
mkdir -p "$work/keys"
printf 'docker:%s\n' "$key" > "$work/keys/api_keys.txt"
chmod -R a+rX "$work/keys"
# Arguments after the image go to `twistd llamaproxy`: --port 9000 moves the gateway.
docker run -d --name "$gw" --label "$RUN_ID" --network "$RUN_ID" --read-only --tmpfs /tmp \
  -p 127.0.0.1::9000 -p 127.0.0.1::8001 -v "$work/keys:/run/keys:ro" \
  -e "BACKEND_URL=http://$llama:8080" -e AUTH_KEYS_FILE=/run/keys/api_keys.txt \
  llamaproxy:gateway --port 9000 >/dev/null
gw_url="http://127.0.0.1:$(port_of "$gw" 9000)"
check "llamaproxy:gateway --port 9000 turns ready against the llama-server container" \
  "$PY" tests/containers/client.py wait-ready "$gw_url" 120
check "streamed chat completion through the gateway-only image" "$PY" tests/containers/client.py stream "$gw_url" "$key"
sigint_stops() {
  docker kill -s INT "$gw" >/dev/null
  local code
  code="$(timeout 60 docker wait "$gw")"
  echo "docker kill -s INT: exit code $code"
  [ "$code" = 0 ]
}
check "SIGINT stops the gateway, exit 0" sigint_stops

summary=done
[ "$failed" = 0 ]
