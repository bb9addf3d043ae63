#!/usr/bin/env bash
# Build llama-cpp-python (the llama.cpp peer used by `pytest -m peer`) from source ONCE, cache the
# wheel outside the repository, and install it into a virtual environment.
#
# Why from source: the prebuilt/native build enables AMX, which crashes on quantized models on
# some CPUs (upstream llama.cpp issue 20824). We build a portable wheel with AMX off and only the
# x86 SIMD extensions this CPU reports in /proc/cpuinfo. The build takes 12+ minutes on 2 cores;
# later runs reuse the cached wheel (the cache key holds the version and the flag set).
#
# Usage: scripts/build_llama_cpp.sh [VENV]       (default VENV: .venv)
# Env:   MINICPM_CACHE (default ~/.cache/minicpm), LLAMA_CPP_PYTHON_VERSION (default 0.3.36),
#        BUILD_JOBS (default: number of cores)
set -euo pipefail

venv=${1:-.venv}
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
cache=${MINICPM_CACHE:-$HOME/.cache/minicpm}/wheels
python="$venv/bin/python"
[ -x "$python" ] || { echo "error: no python at $python (create the venv first)" >&2; exit 1; }

# --- CMake flags: AMX always off, each SIMD extension on only if the CPU has it ----------------
source "$(dirname "$0")/llama_cpp_flags.sh"

key=$(printf '%s %s' "$version" "$cmake_args" | sha256sum | cut -c1-12)
wheel_dir="$cache/llama-cpp-python-$version-$key"

# --- build once ----------------------------------------------------------------------------------
if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $version into $wheel_dir"
  echo "CMAKE_ARGS=$cmake_args"
  tmp="$wheel_dir.tmp.$$"
  rm -rf "$tmp" && mkdir -p "$tmp"
  start=$(date +%s)
  CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=${BUILD_JOBS:-$(nproc)} \
    "$python" -m pip wheel --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$version" -w "$tmp"
  printf 'version=%s\nCMAKE_ARGS=%s\nbuild_seconds=%s\n' \
    "$version" "$cmake_args" "$(( $(date +%s) - start ))" > "$tmp/BUILD_INFO"
  rm -rf "$wheel_dir" && mv "$tmp" "$wheel_dir"  # publish only a finished build
fi

# --- install (its pure-Python dependencies come from the package index) --------------------------
"$python" -m pip install --force-reinstall --no-deps "$wheel_dir"/llama_cpp_python-*.whl
"$python" -m pip install "typing-extensions>=4.5" "numpy>=1.20" "diskcache>=5.6.1" "jinja2>=2.11.3"
"$python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'installed in $venv')"
cat "$wheel_dir/BUILD_INFO"
