#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (parallel slots, continuous batching) ONCE, for the serving
# benchmark, from the llama.cpp source that the llama-cpp-python sdist vendors: the same version
# and the same CMake flags as the llama-cpp-python peer (scripts/llama_cpp_flags.sh; AMX off).
# The binary is cached outside the repository; later runs print its path at once.
#
# Usage: scripts/build_llama_server.sh [VENV]    prints the path of the llama-server binary last
# Env:   MINICPM_CACHE (default ~/.cache/minicpm), LLAMA_CPP_PYTHON_VERSION (default 0.3.36),
#        BUILD_JOBS (default: number of cores)
set -euo pipefail

venv=${1:-.venv}
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
python="$venv/bin/python"
[ -x "$python" ] || { echo "error: no python at $python (create the venv first)" >&2; exit 1; }
source "$(dirname "$0")/llama_cpp_flags.sh"
key=$(printf '%s %s server' "$version" "$cmake_args" | sha256sum | cut -c1-12)
out="${MINICPM_CACHE:-$HOME/.cache/minicpm}/llama-server-$version-$key"

if [ ! -x "$out/llama-server" ]; then
  echo "building llama-server (llama.cpp from llama-cpp-python $version) into $out" >&2
  echo "CMAKE_ARGS=$cmake_args" >&2
  tmp="$out.tmp.$$"
  rm -rf "$tmp" && mkdir -p "$tmp"
  trap 'rm -rf "$tmp"' EXIT
  "$python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp" >&2
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  src=$(echo "$tmp"/llama_cpp_python-*/vendor/llama.cpp)
  start=$(date +%s)
  # shellcheck disable=SC2086  # cmake_args is a list of flags
  cmake -S "$src" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    $cmake_args >&2
  cmake --build "$tmp/build" --target llama-server -j "${BUILD_JOBS:-$(nproc)}" >&2
  mkdir -p "$tmp/out"
  cp "$tmp/build/bin/llama-server" "$tmp/out/"
  printf 'version=%s\nCMAKE_ARGS=%s\nbuild_seconds=%s\n' \
    "$version" "$cmake_args" "$(( $(date +%s) - start ))" > "$tmp/out/BUILD_INFO"
  rm -rf "$out" && mv "$tmp/out" "$out"  # publish only a finished build
fi
echo "$out/llama-server"
