/* The AVX-512 intrinsics our kernels use, on CPUs that only have AVX2 + FMA + F16C.
 *
 * Most laptops and many servers (AMD before Zen 4, Intel client cores) have no AVX-512. Rather
 * than a second copy of every kernel, a kernel includes this header after <immintrin.h>: where
 * the compiler targets AVX-512 (F, BW, VL, and VNNI when the kernel defines MC_NEEDS_VNNI) it
 * does nothing; elsewhere it renames the 512-bit types and intrinsics to the functions below,
 * each the same operation on two 256-bit halves (lanes 0-7 in `lo`, 8-15 in `hi`). Results are
 * the same as AVX-512's bit for bit, except where noted (reductions keep AVX-512's tree order).
 * A kernel that needs AVX-512 VNNI or BF16 defines MC_NEEDS_VNNI or MC_NEEDS_BF16 first: a CPU
 * with AVX-512 but not those then takes the AVX2 path whole.
 * Masked 16-bit loads and stores, which AVX2 lacks, go element by element; they serve tails only.
 *
 * mc_dpbusd_small_epi32(acc, a, b) is vpdpbusd for unsigned bytes a <= 127 (int4 codes): three
 * instructions here, where the general emulation needs more to stay exact for any unsigned byte.
 *
 * Nibble sums: p = mc_nibble_start(acc); up to 8 times p = mc_nibble_dot(p, a, b) with a <= 15
 * (int4 codes) and b > -128; acc = mc_nibble_end(acc, p). With VNNI p is acc and each dot a
 * vpdpbusd; on AVX2 p holds 16-bit pair sums (8 dots reach at most 8 * 2 * 15 * 127 = 30480, no
 * saturation), so a dot is vpmaddubsw + vpaddw and the widening vpmaddwd runs once per 8 dots.
 *
 * Int8 weights stored as code + 128: mc_dpbusd_int8_epi32(acc, a, b) is vpdpbusd with VNNI (sums of
 * a * b: the kernel takes MC_INT8_OFFSET * sum(b) = 128 * sum(b) off afterwards); on AVX2 it sums
 * (a - 128) * b directly (MC_INT8_OFFSET 0), four instructions fewer than vpdpbusd emulated.
 */
#ifndef MINICPM_AVX512_ON_AVX2_H
#define MINICPM_AVX512_ON_AVX2_H

#include <immintrin.h>
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    (defined(__AVX512VNNI__) || !defined(MC_NEEDS_VNNI)) && (defined(__AVX512BF16__) || !defined(MC_NEEDS_BF16))

#define MC_BH(v) ((__m512bh)(v))  /* 32 bf16 values, from a __m512i */

#ifdef __AVX512VNNI__
#define mc_dpbusd_small_epi32 _mm512_dpbusd_epi32
#define mc_nibble_start(acc) (acc)
#define mc_nibble_dot _mm512_dpbusd_epi32
#define mc_nibble_end(acc, p) (p)
#define mc_dpbusd_int8_epi32 _mm512_dpbusd_epi32
#define MC_INT8_OFFSET 128
#endif

#else  /* AVX2 */

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "the native kernels need AVX2, FMA and F16C (or AVX-512)"
#endif

#define MC_EMULATED 1  /* kernels may size their register tiles for 16 ymm registers instead of 32 zmm */
typedef struct { __m256 lo, hi; } mc_ps;
typedef struct { __m256i lo, hi; } mc_si;

#define __m512 mc_ps
#define __m512i mc_si
#define __m512bh mc_si
#define MC_BH(v) (v)

/* every name below is ours from here on (a function of this header, or a macro) */
#undef _mm256_mask_storeu_epi16
#define _mm256_mask_storeu_epi16 mc_mm256_mask_storeu_epi16
#undef _mm256_maskz_loadu_epi16
#define _mm256_maskz_loadu_epi16 mc_mm256_maskz_loadu_epi16
#undef _mm512_abs_ps
#define _mm512_abs_ps mc_mm512_abs_ps
#undef _mm512_add_epi32
#define _mm512_add_epi32 mc_mm512_add_epi32
#undef _mm512_add_ps
#define _mm512_add_ps mc_mm512_add_ps
#undef _mm512_and_si512
#define _mm512_and_si512 mc_mm512_and_si512
#undef _mm512_castps_si512
#define _mm512_castps_si512 mc_mm512_castps_si512
#undef _mm512_castsi512_ps
#define _mm512_castsi512_ps mc_mm512_castsi512_ps
#undef _mm512_cvtepi32_epi16
#define _mm512_cvtepi32_epi16 mc_mm512_cvtepi32_epi16
#undef _mm512_cvtepi32_epi8
#define _mm512_cvtepi32_epi8 mc_mm512_cvtepi32_epi8
#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps mc_mm512_cvtepi32_ps
#undef _mm512_cvtepi8_epi32
#define _mm512_cvtepi8_epi32 mc_mm512_cvtepi8_epi32
#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32 mc_mm512_cvtepu16_epi32
#undef _mm512_cvtepu8_epi32
#define _mm512_cvtepu8_epi32 mc_mm512_cvtepu8_epi32
#undef _mm512_cvtph_ps
#define _mm512_cvtph_ps mc_mm512_cvtph_ps
#undef _mm512_cvtps_epi32
#define _mm512_cvtps_epi32 mc_mm512_cvtps_epi32
#undef _mm512_dpbf16_ps
#define _mm512_dpbf16_ps mc_mm512_dpbf16_ps
#undef _mm512_dpbusd_epi32
#define _mm512_dpbusd_epi32 mc_mm512_dpbusd_epi32
#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps mc_mm512_fmadd_ps
#undef _mm512_fnmadd_ps
#define _mm512_fnmadd_ps mc_mm512_fnmadd_ps
#undef _mm512_loadu_ps
#define _mm512_loadu_ps mc_mm512_loadu_ps
#undef _mm512_loadu_si512
#define _mm512_loadu_si512 mc_mm512_loadu_si512
#undef _mm512_mask_blend_ps
#define _mm512_mask_blend_ps mc_mm512_mask_blend_ps
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps mc_mm512_mask_storeu_ps
#undef _mm512_maskz_loadu_epi16
#define _mm512_maskz_loadu_epi16 mc_mm512_maskz_loadu_epi16
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps mc_mm512_maskz_loadu_ps
#undef _mm512_maskz_mov_ps
#define _mm512_maskz_mov_ps mc_mm512_maskz_mov_ps
#undef _mm512_max_ps
#define _mm512_max_ps mc_mm512_max_ps
#undef _mm512_mul_ps
#define _mm512_mul_ps mc_mm512_mul_ps
#undef _mm512_reduce_add_epi32
#define _mm512_reduce_add_epi32 mc_mm512_reduce_add_epi32
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps mc_mm512_reduce_add_ps
#undef _mm512_reduce_max_ps
#define _mm512_reduce_max_ps mc_mm512_reduce_max_ps
#undef _mm512_set1_epi32
#define _mm512_set1_epi32 mc_mm512_set1_epi32
#undef _mm512_set1_epi8
#define _mm512_set1_epi8 mc_mm512_set1_epi8
#undef _mm512_set1_ps
#define _mm512_set1_ps mc_mm512_set1_ps
#undef _mm512_shuffle_f32x4
#define _mm512_shuffle_f32x4 mc_mm512_shuffle_f32x4
#undef _mm512_slli_epi32
#define _mm512_slli_epi32 mc_mm512_slli_epi32
#undef _mm512_srli_epi16
#define _mm512_srli_epi16 mc_mm512_srli_epi16
#undef _mm512_srli_epi32
#define _mm512_srli_epi32 mc_mm512_srli_epi32
#undef _mm512_storeu_ps
#define _mm512_storeu_ps mc_mm512_storeu_ps
#undef _mm512_sub_ps
#define _mm512_sub_ps mc_mm512_sub_ps
#undef _mm512_unpackhi_ps
#define _mm512_unpackhi_ps mc_mm512_unpackhi_ps
#undef _mm512_unpacklo_ps
#define _mm512_unpacklo_ps mc_mm512_unpacklo_ps
#undef _mm512_cvtps_ph
#undef _mm512_roundscale_ps
#undef _mm512_setzero_ps
#undef _mm512_setzero_si512
#undef _mm512_shuffle_ps

#define MC_F static inline __attribute__((always_inline))

MC_F mc_ps mc_ps2(__m256 lo, __m256 hi) { mc_ps r = {lo, hi}; return r; }
MC_F mc_si mc_si2(__m256i lo, __m256i hi) { mc_si r = {lo, hi}; return r; }

/* lane i of the result is all ones where bit i of k is set */
MC_F __m256i mc_lanes8(unsigned k) {
    const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)k), bits), bits);
}

/* ---- floats */
#define _mm512_setzero_ps() mc_ps2(_mm256_setzero_ps(), _mm256_setzero_ps())
MC_F mc_ps _mm512_set1_ps(float f) { return mc_ps2(_mm256_set1_ps(f), _mm256_set1_ps(f)); }
MC_F mc_ps _mm512_loadu_ps(const void *p) {
    return mc_ps2(_mm256_loadu_ps((const float *)p), _mm256_loadu_ps((const float *)p + 8));
}
MC_F void _mm512_storeu_ps(void *p, mc_ps v) {
    _mm256_storeu_ps((float *)p, v.lo);
    _mm256_storeu_ps((float *)p + 8, v.hi);
}
MC_F mc_ps _mm512_maskz_loadu_ps(__mmask16 k, const void *p) {
    return mc_ps2(_mm256_maskload_ps((const float *)p, mc_lanes8(k & 0xff)),
                  _mm256_maskload_ps((const float *)p + 8, mc_lanes8(k >> 8)));
}
MC_F void _mm512_mask_storeu_ps(void *p, __mmask16 k, mc_ps v) {
    _mm256_maskstore_ps((float *)p, mc_lanes8(k & 0xff), v.lo);
    _mm256_maskstore_ps((float *)p + 8, mc_lanes8(k >> 8), v.hi);
}
#define MC_PS_BINARY(name, op) \
    MC_F mc_ps name(mc_ps a, mc_ps b) { return mc_ps2(op(a.lo, b.lo), op(a.hi, b.hi)); }
MC_PS_BINARY(_mm512_add_ps, _mm256_add_ps)
MC_PS_BINARY(_mm512_sub_ps, _mm256_sub_ps)
MC_PS_BINARY(_mm512_mul_ps, _mm256_mul_ps)
MC_PS_BINARY(_mm512_max_ps, _mm256_max_ps)
MC_PS_BINARY(_mm512_unpacklo_ps, _mm256_unpacklo_ps)
MC_PS_BINARY(_mm512_unpackhi_ps, _mm256_unpackhi_ps)
MC_F mc_ps _mm512_fmadd_ps(mc_ps a, mc_ps b, mc_ps c) {
    return mc_ps2(_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi));
}
MC_F mc_ps _mm512_fnmadd_ps(mc_ps a, mc_ps b, mc_ps c) {
    return mc_ps2(_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi));
}
MC_F mc_ps _mm512_abs_ps(mc_ps a) {
    const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    return mc_ps2(_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m));
}
MC_F mc_ps _mm512_maskz_mov_ps(__mmask16 k, mc_ps a) {
    return mc_ps2(_mm256_and_ps(a.lo, _mm256_castsi256_ps(mc_lanes8(k & 0xff))),
                  _mm256_and_ps(a.hi, _mm256_castsi256_ps(mc_lanes8(k >> 8))));
}
MC_F mc_ps _mm512_mask_blend_ps(__mmask16 k, mc_ps a, mc_ps b) {  /* b where k is set */
    return mc_ps2(_mm256_blendv_ps(a.lo, b.lo, _mm256_castsi256_ps(mc_lanes8(k & 0xff))),
                  _mm256_blendv_ps(a.hi, b.hi, _mm256_castsi256_ps(mc_lanes8(k >> 8))));
}
/* the rounding modes our kernels pass are immediates: macros keep them so */
#define _mm512_roundscale_ps(a, imm) \
    ({ const mc_ps _a = (a); mc_ps2(_mm256_round_ps(_a.lo, (imm)), _mm256_round_ps(_a.hi, (imm))); })
#define _mm512_shuffle_ps(a, b, imm) \
    ({ const mc_ps _a = (a), _b = (b); mc_ps2(_mm256_shuffle_ps(_a.lo, _b.lo, (imm)), _mm256_shuffle_ps(_a.hi, _b.hi, (imm))); })
MC_F __m128 mc_block(mc_ps a, int i) {  /* 128-bit block i (0..3) */
    const __m256 h = i < 2 ? a.lo : a.hi;
    return i & 1 ? _mm256_extractf128_ps(h, 1) : _mm256_castps256_ps128(h);
}
/* blocks a[imm & 3], a[imm >> 2 & 3], b[imm >> 4 & 3], b[imm >> 6 & 3] */
MC_F mc_ps _mm512_shuffle_f32x4(mc_ps a, mc_ps b, int imm) {
    return mc_ps2(_mm256_set_m128(mc_block(a, imm >> 2 & 3), mc_block(a, imm & 3)),
                  _mm256_set_m128(mc_block(b, imm >> 6 & 3), mc_block(b, imm >> 4 & 3)));
}
/* AVX-512's order: halves, then quarters, ... (GCC's _mm512_reduce_add_ps) */
MC_F float _mm512_reduce_add_ps(mc_ps a) {
    const __m256 s8 = _mm256_add_ps(a.lo, a.hi);
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
MC_F float _mm512_reduce_max_ps(mc_ps a) {
    const __m256 s8 = _mm256_max_ps(a.lo, a.hi);
    const __m128 s4 = _mm_max_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_max_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_max_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

/* ---- conversions */
MC_F mc_ps _mm512_cvtepi32_ps(mc_si a) { return mc_ps2(_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)); }
MC_F mc_si _mm512_cvtps_epi32(mc_ps a) { return mc_si2(_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)); }
MC_F mc_ps _mm512_castsi512_ps(mc_si a) { return mc_ps2(_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)); }
MC_F mc_si _mm512_castps_si512(mc_ps a) { return mc_si2(_mm256_castps_si256(a.lo), _mm256_castps_si256(a.hi)); }
MC_F mc_ps _mm512_cvtph_ps(__m256i h) {
    return mc_ps2(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)));
}
#define _mm512_cvtps_ph(a, imm) \
    ({ const mc_ps _a = (a); _mm256_set_m128i(_mm256_cvtps_ph(_a.hi, (imm)), _mm256_cvtps_ph(_a.lo, (imm))); })
MC_F mc_si _mm512_cvtepu16_epi32(__m256i h) {
    return mc_si2(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), _mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)));
}
MC_F mc_si _mm512_cvtepu8_epi32(__m128i b) {
    return mc_si2(_mm256_cvtepu8_epi32(b), _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
}
MC_F mc_si _mm512_cvtepi8_epi32(__m128i b) {
    return mc_si2(_mm256_cvtepi8_epi32(b), _mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
}
/* truncations (vpmovdw, vpmovdb): the low 16 or 8 bits of each lane */
MC_F __m128i mc_low16(__m256i v) {
    const __m256i pick = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, pick), 0x08));
}
MC_F __m256i _mm512_cvtepi32_epi16(mc_si a) { return _mm256_set_m128i(mc_low16(a.hi), mc_low16(a.lo)); }
MC_F __m128i _mm512_cvtepi32_epi8(mc_si a) {
    const __m128i lo = mc_low16(a.lo), hi = mc_low16(a.hi);  /* 8 x 16 bits each: keep the low bytes */
    const __m128i pick = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
    return _mm_unpacklo_epi64(_mm_shuffle_epi8(lo, pick), _mm_shuffle_epi8(hi, pick));
}

/* ---- 16-bit masked loads and stores (tails only) */
MC_F __m256i _mm256_maskz_loadu_epi16(__mmask16 k, const void *p) {
    if (k == 0xffff) return _mm256_loadu_si256((const __m256i *)p);
    uint16_t t[16];
    for (int i = 0; i < 16; i++) t[i] = k >> i & 1 ? ((const uint16_t *)p)[i] : 0;
    return _mm256_loadu_si256((const __m256i *)t);
}
MC_F void _mm256_mask_storeu_epi16(void *p, __mmask16 k, __m256i v) {
    if (k == 0xffff) {
        _mm256_storeu_si256((__m256i *)p, v);
        return;
    }
    uint16_t t[16];
    _mm256_storeu_si256((__m256i *)t, v);
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) ((uint16_t *)p)[i] = t[i];
}

/* ---- integers */
#define _mm512_setzero_si512() mc_si2(_mm256_setzero_si256(), _mm256_setzero_si256())
MC_F mc_si _mm512_set1_epi32(int v) { return mc_si2(_mm256_set1_epi32(v), _mm256_set1_epi32(v)); }
MC_F mc_si _mm512_set1_epi8(char v) { return mc_si2(_mm256_set1_epi8(v), _mm256_set1_epi8(v)); }
MC_F mc_si _mm512_loadu_si512(const void *p) {
    return mc_si2(_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)p + 1));
}
MC_F mc_si _mm512_maskz_loadu_epi16(__mmask32 k, const void *p) {
    if (k == 0xffffffffu) return _mm512_loadu_si512(p);
    uint16_t t[32];
    for (int i = 0; i < 32; i++) t[i] = k >> i & 1 ? ((const uint16_t *)p)[i] : 0;
    return _mm512_loadu_si512(t);
}
MC_F mc_si _mm512_and_si512(mc_si a, mc_si b) { return mc_si2(_mm256_and_si256(a.lo, b.lo), _mm256_and_si256(a.hi, b.hi)); }
MC_F mc_si _mm512_add_epi32(mc_si a, mc_si b) { return mc_si2(_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)); }
MC_F mc_si _mm512_srli_epi16(mc_si a, int n) { return mc_si2(_mm256_srli_epi16(a.lo, n), _mm256_srli_epi16(a.hi, n)); }
MC_F mc_si _mm512_srli_epi32(mc_si a, int n) { return mc_si2(_mm256_srli_epi32(a.lo, n), _mm256_srli_epi32(a.hi, n)); }
MC_F mc_si _mm512_slli_epi32(mc_si a, int n) { return mc_si2(_mm256_slli_epi32(a.lo, n), _mm256_slli_epi32(a.hi, n)); }
MC_F int _mm512_reduce_add_epi32(mc_si a) {
    const __m256i s8 = _mm256_add_epi32(a.lo, a.hi);
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1)));
}

/* vdpbf16ps: acc + a[2i+1] b[2i+1], then + a[2i] b[2i], per fp32 lane i. A product of two
 * bf16 values is exact in fp32, so each step is one FMA's rounding, as the instruction's own
 * (which also flushes denormals; FMA keeps them). */
MC_F __m256 mc_dpbf16_8(__m256 acc, __m256i a, __m256i b) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(a, high)), _mm256_castsi256_ps(_mm256_and_si256(b, high)), acc);
    return _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)), acc);
}
MC_F mc_ps _mm512_dpbf16_ps(mc_ps acc, mc_si a, mc_si b) {
    return mc_ps2(mc_dpbf16_8(acc.lo, a.lo, b.lo), mc_dpbf16_8(acc.hi, a.hi, b.hi));
}

/* vpdpbusd: acc + the sum of 4 products (unsigned byte of a) x (signed byte of b) per 32-bit lane.
 * a - 128 is a signed byte; (a - 128) * b goes through vpmaddubsw as |a - 128| * (b signed by
 * a - 128), whose pairs fit in 16 bits unless b = -128, which the kernels never pass (their x codes
 * are -127..127); then 128 * (sum of b's 4 bytes) is added back. */
MC_F __m256i mc_dpbusd8(__m256i acc, __m256i a, __m256i b) {
    const __m256i ones16 = _mm256_set1_epi16(1), centred = _mm256_xor_si256(a, _mm256_set1_epi8((char)0x80));
    const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(centred), _mm256_sign_epi8(b, centred)),
                                          ones16);
    const __m256i sum = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), b), ones16);
    return _mm256_add_epi32(acc, _mm256_add_epi32(dot, _mm256_slli_epi32(sum, 7)));
}
MC_F mc_si _mm512_dpbusd_epi32(mc_si acc, mc_si a, mc_si b) {
    return mc_si2(mc_dpbusd8(acc.lo, a.lo, b.lo), mc_dpbusd8(acc.hi, a.hi, b.hi));
}
/* a <= 127 and b > -128: a pair of products is at most 2 * 127 * 127, no saturation */
MC_F __m256i mc_dpbusd_small8(__m256i acc, __m256i a, __m256i b) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
}
MC_F mc_si mc_dpbusd_small_epi32(mc_si acc, mc_si a, mc_si b) {
    return mc_si2(mc_dpbusd_small8(acc.lo, a.lo, b.lo), mc_dpbusd_small8(acc.hi, a.hi, b.hi));
}
/* (a - 128) * b summed in fours: |a - 128| <= 128 is vpmaddubsw's unsigned side, b signed by a - 128
 * its signed side (b > -128), so a pair reaches at most 2 * 128 * 127, no saturation */
MC_F __m256i mc_dpbusd_int8_8(__m256i acc, __m256i a, __m256i b) {
    const __m256i centred = _mm256_xor_si256(a, _mm256_set1_epi8((char)0x80));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(centred),
                                                                        _mm256_sign_epi8(b, centred)),
                                                   _mm256_set1_epi16(1)));
}
MC_F mc_si mc_dpbusd_int8_epi32(mc_si acc, mc_si a, mc_si b) {
    return mc_si2(mc_dpbusd_int8_8(acc.lo, a.lo, b.lo), mc_dpbusd_int8_8(acc.hi, a.hi, b.hi));
}
#define MC_INT8_OFFSET 0
MC_F mc_si mc_nibble_start(mc_si acc) {
    (void)acc;
    return mc_si2(_mm256_setzero_si256(), _mm256_setzero_si256());
}
MC_F mc_si mc_nibble_dot(mc_si p, mc_si a, mc_si b) {
    return mc_si2(_mm256_add_epi16(p.lo, _mm256_maddubs_epi16(a.lo, b.lo)),
                  _mm256_add_epi16(p.hi, _mm256_maddubs_epi16(a.hi, b.hi)));
}
MC_F mc_si mc_nibble_end(mc_si acc, mc_si p) {
    const __m256i ones16 = _mm256_set1_epi16(1);
    return mc_si2(_mm256_add_epi32(acc.lo, _mm256_madd_epi16(p.lo, ones16)),
                  _mm256_add_epi32(acc.hi, _mm256_madd_epi16(p.hi, ones16)));
}

#undef MC_F
#undef MC_PS_BINARY
#endif /* AVX2 */
#endif /* MINICPM_AVX512_ON_AVX2_H */
