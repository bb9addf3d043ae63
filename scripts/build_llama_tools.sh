#!/usr/bin/env bash
# Build llama.cpp's own command-line tools (llama-server, llama-quantize, llama-imatrix,
# llama-perplexity, llama-bench) ONCE, for the benchmarks that compare with them, from the
# llama.cpp source that the llama-cpp-python sdist vendors: the same version and the same CMake
# flags as the llama-cpp-python peer (scripts/llama_cpp_flags.sh; AMX off). All of them are built
# when any asked for is missing (one configure, ~7 min on 2 cores), into a folder outside the
# repository; later runs print that folder at once.
#
# Usage: scripts/build_llama_tools.sh VENV TARGET...   prints the folder holding the binaries last
#   e.g. scripts/build_llama_tools.sh .venv llama-quantize llama-perplexity
# Env:   MINICPM_CACHE (default ~/.cache/minicpm), LLAMA_CPP_PYTHON_VERSION (default 0.3.36),
#        BUILD_JOBS (default: number of cores)
set -euo pipefail

[ $# -ge 2 ] || { echo "usage: $0 VENV TARGET..." >&2; exit 2; }
venv=$1; shift
wanted=("$@")
targets=(llama-server llama-quantize llama-imatrix llama-perplexity llama-bench)
for t in "${wanted[@]}"; do
  [[ " ${targets[*]} " == *" $t "* ]] || { echo "error: $t is not one of: ${targets[*]}" >&2; exit 2; }
done
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
python="$venv/bin/python"
[ -x "$python" ] || { echo "error: no python at $python (create the venv first)" >&2; exit 1; }
source "$(dirname "$0")/llama_cpp_flags.sh"
key=$(printf '%s %s %s' "$version" "$cmake_args" "${targets[*]}" | sha256sum | cut -c1-12)
out="${MINICPM_CACHE:-$HOME/.cache/minicpm}/llama-tools-$version-$key"

built() { for t in "${wanted[@]}"; do [ -x "$out/$t" ] || return 1; done; }
if ! built; then
  echo "building ${targets[*]} (llama.cpp from llama-cpp-python $version) into $out" >&2
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
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON $cmake_args >&2
  cmake --build "$tmp/build" --target "${targets[@]}" -j "${BUILD_JOBS:-$(nproc)}" >&2
  mkdir -p "$tmp/out"
  for t in "${targets[@]}"; do cp "$tmp/build/bin/$t" "$tmp/out/"; done
  printf 'version=%s\nCMAKE_ARGS=%s\ntargets=%s\nbuild_seconds=%s\n' \
    "$version" "$cmake_args" "${targets[*]}" "$(( $(date +%s) - start ))" > "$tmp/out/BUILD_INFO"
  rm -rf "$out" && mv "$tmp/out" "$out"  # publish only a finished build
fi
echo "$out"
