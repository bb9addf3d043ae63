# Sourced by the llama.cpp build scripts: sets `cmake_args`, the one CMake flag set both builds use.
# AMX is always off (its kernels crash on quantized models on some CPUs: upstream llama.cpp issue
# 20824); each x86 SIMD extension is on only if /proc/cpuinfo reports it, and GGML_NATIVE is off
# so that the flags, not the compiler's guess, decide.
cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has() { [[ "$cpu_flags" == *" $1 "* ]]; }
onoff() { if has "$1"; then echo ON; else echo OFF; fi; }
avx512=OFF
if has avx512f && has avx512cd && has avx512vl && has avx512dq && has avx512bw; then avx512=ON; fi
cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX=$(onoff avx) -DGGML_AVX2=$(onoff avx2)"
cmake_args+=" -DGGML_FMA=$(onoff fma) -DGGML_F16C=$(onoff f16c) -DGGML_AVX512=$avx512"
if [ "$avx512" = ON ]; then
  cmake_args+=" -DGGML_AVX512_VNNI=$(onoff avx512_vnni) -DGGML_AVX512_BF16=$(onoff avx512_bf16)"
  cmake_args+=" -DGGML_AVX512_VBMI=$(onoff avx512vbmi)"
else
  cmake_args+=" -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX512_VBMI=OFF"
fi
cmake_args+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
