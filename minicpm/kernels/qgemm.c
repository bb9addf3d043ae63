/* Weight-only int4/int8 GEMM for small and large batches on AVX-512 VNNI CPUs (and, through
 * avx512_on_avx2.h, on AVX2 ones: vpdpbusd becomes vpmaddubsw + vpmaddwd).
 *
 * y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), w held as integer codes:
 *   int4: w = (q - z[n, g]) * s[n, g], q in 0..15, groups of G along k    (form 0: zero points)
 *         w = q * s[n, g] + m[n, g]                                   (form 1: offsets; GGUF's
 *         Q4_1/Q4_K blocks are exactly this, m the block's min)
 *         w = (q - 8) * s[n, g]                                       (form 2: GGUF's Q4_0, no
 *         zero points stored: 2 bytes of metadata per 32 values instead of 4)
 *         w = q * (d sc[n, g]) - dmin mn[n, g]                        (form 3: GGUF's Q4_K as
 *         stored: fp16 d, dmin per 256 values, 6-bit sc, mn per 32 held in bytes; form 1's
 *         fp32 products, computed here exactly, in 2.5 bytes per 32 values instead of 8)
 *   int8: w = (u - 128) * s[n],        u = q + 128 in 1..255          (G = 0: a scale per row)
 *         w = (u - 128) * s[n, g]                                     (G = 16 or 32j: per group,
 *         as GGUF's Q8_0 (32) and Q6_K (16) blocks)
 *   int6: w = (q - 32) * (d sc[n, g]), q in 0..63                    (form 3, groups of 16: GGUF's
 *         Q6_K as stored: fp16 d per 256 values, int8 sc per 16; 0.82 bytes a weight, not 1.25)
 *
 * x is quantized to int8 per block of QB values (one float scale d per block), so the inner
 * products are u8 x s8 -> s32 (vpdpbusd). The zero points come out through per-group sums of
 * the quantized x:  sum_k (q - z) x = sum_b d_b dot(q, xq)_b - z * sum_b d_b sum(xq_b);
 * offsets the same way: sum_k (q s + m) x = s sum_b d_b dot(q, xq)_b + m * sum_b d_b sum(xq_b).
 * Form 2's constant zero point 8 is folded into the int32 sums instead: each block's accumulator
 * starts at -8 sum(xq_b), so a group costs one float product (s * sum) and no group sums.
 * Groups of 16 (smaller than the x block) split a block's 8 int8 loads into two halves.
 * For the int4 tiles the block scales are the row's scale times powers of two (quantize_row_pow2),
 * so d_b enters as an exponent add and the row's scale multiplies each output once.
 *
 * Weight layout: tiles of 16 output rows, one 32-bit lane per row, so that a vpdpbusd against a
 * broadcast of 4 x bytes does 16 rows x 4 k at once and no horizontal sums are needed.
 *   int4: [tile][k/32][4 loads][16 rows][4 bytes]; a byte holds k = 4L+b (low nibble) and
 *         16+4L+b (high nibble) of its 32-k block, so and/shift give two vpdpbusd operands.
 *   int8: [tile][k/32][8 loads][16 rows][4 bytes], k = 4L+b.
 *   int6: [tile][k/32][6 loads][16 rows][4 bytes]: int4's 4 loads of bits 0-3, then 2 of bits 4-5.
 * Scales and zeros/offsets: [tile][group][16] in fp32, bf16 or fp16 (kind 0, 1, 2); per-row int8
 * scales: [tile][16].
 */
#include <immintrin.h>
#define MC_NEEDS_VNNI  /* vpdpbusd: emulated below AVX-512 VNNI */
#include "avx512_on_avx2.h"
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { K_F32 = 0, K_BF16 = 1, K_F16 = 2 };
#ifndef PF_DIST
#define PF_DIST 0  /* bytes of weight to prefetch ahead; 0: hardware prefetch only (software prefetch at
                      1-4 KB measured slower on Zen 4) */
#endif
#define PAIR_MC 4  /* x rows per pass over a pair of int4 tiles */
#ifdef MC_EMULATED
/* AVX2 has 16 registers of half the width: a pair of tiles, or a second chain of int32 sums,
 * spills there. One tile and one chain at 4 rows a pass ran 6-8% faster than AVX-512's shapes
 * (Zen 3, M = 128-512, 1-2 threads; M = 1 the same). */
#define MC_MAX 4
#define PAIR_ROWS 0x7fffffffL
#define INT4_CHAINS(MC, NT) 1
#else
#define MC_MAX 6   /* x rows per pass over a weight tile (their accumulators stay in registers) */
#define PAIR_ROWS 4  /* pairs from this many x rows: below, a product streams its weights from memory, and
                        one tile at a time streams them faster (decode, M = 1: ~10% on Zen 4) */
#define INT4_CHAINS(MC, NT) ((MC) * (NT) <= 4 ? 2 : 1)  /* two chains of sums hide vpdpbusd's latency */
#endif
#define MB 64      /* x rows per outer block, so their int8 copy stays in L2 */

typedef __attribute__((aligned(1), may_alias)) int32_t i32u;

static inline __m512 cvt_bf16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m512 load16(const void *p, long i, int kind) {
    if (kind == K_F32) return _mm512_loadu_ps((const float *)p + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    return kind == K_BF16 ? cvt_bf16(h) : _mm512_cvtph_ps(h);
}

static inline __m512 load16_mask(const void *p, long i, int kind, __mmask16 k) {
    if (kind == K_F32) return _mm512_maskz_loadu_ps(k, (const float *)p + i);
    __m256i h = _mm256_maskz_loadu_epi16(k, (const uint16_t *)p + i);
    return kind == K_BF16 ? cvt_bf16(h) : _mm512_cvtph_ps(h);
}

static inline void store16_mask(void *p, long i, int kind, __m512 v, __mmask16 k) {
    if (kind == K_F32) {
        _mm512_mask_storeu_ps((float *)p + i, k, v);
        return;
    }
    __m256i h;
    if (kind == K_BF16) {  /* round to nearest even, as PyTorch does */
        __m512i u = _mm512_castps_si512(v);
        __m512i r = _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
        h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, r), 16));
    } else {
        h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm256_mask_storeu_epi16((uint16_t *)p + i, k, h);
}

static inline __mmask16 tail_mask(long left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }

static inline __m512 load_x16(const void *x, int xkind, long K, long k) {
    return load16_mask(x, k, xkind, tail_mask(K - k > 0 ? K - k : 0));
}

/* max |x| over values b0..b0+16*nv of one row */
static inline float block_absmax(const void *x, int xkind, long K, long b0, int nv) {
    __m512 amax = _mm512_setzero_ps();
    for (int i = 0; i < nv; i++) amax = _mm512_max_ps(amax, _mm512_abs_ps(load_x16(x, xkind, K, b0 + 16 * i)));
    return _mm512_reduce_max_ps(amax);
}

/* Values b0..b0+16*nv of one row -> int8 codes q[b0..] = round(x * id); returns their integer sum,
 * and with `sums` also writes the sum of each 16 (NULL: one horizontal sum instead of nv). */
static inline int block_codes(const void *x, int xkind, long K, long b0, int nv, float id, int8_t *q, int *sums) {
    __m512i all = _mm512_setzero_si512();
    int total = 0;
    for (int i = 0; i < nv; i++) {
        __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(load_x16(x, xkind, K, b0 + 16 * i), _mm512_set1_ps(id)));
        _mm_storeu_si128((__m128i *)(q + b0 + 16 * i), _mm512_cvtepi32_epi8(qi));
        if (sums)
            total += sums[i] = _mm512_reduce_add_epi32(qi);
        else
            all = _mm512_add_epi32(all, qi);
    }
    return sums ? total : _mm512_reduce_add_epi32(all);
}

/* A block's codes at its own scale max|x| / 127 (returned). */
static inline float quantize_block(const void *x, int xkind, long K, long b0, int nv, int8_t *q, int *sums) {
    const float m = block_absmax(x, xkind, K, b0, nv);
    block_codes(x, xkind, K, b0, nv, m > 0.f ? 127.f / m : 0.f, q, sums);
    return m / 127.f;
}

/* One row of x -> int8 codes q[Kp] (zero past K), block scales d[Kp/QB], the blocks' integer sums
 * bs[Kp/QB], and per group of G the sums xg[g] = sum_b d_b * sum(q_b) that carry the zero points
 * (G = 16: one per 16 values). */
static void quantize_row(const void *x, int xkind, long K, long Kp, int QB, int G,
                         int8_t *q, float *d, int *bs, float *xg) {
    int nv = QB / 16, sums[8];
    for (long g0 = 0; g0 < Kp; g0 += G > QB ? G : QB) {
        float gs = 0.f;
        for (long b0 = g0; b0 < g0 + G || b0 == g0; b0 += QB) {
            float dd = quantize_block(x, xkind, K, b0, nv, q, sums);
            d[b0 / QB] = dd;
            int total = 0;
            for (int i = 0; i < nv; i++) total += sums[i];
            bs[b0 / QB] = total;
            if (G < QB) {  /* groups of 16 */
                for (int i = 0; i < nv; i++) xg[b0 / 16 + i] = dd * (float)sums[i];
                continue;
            }
            gs += dd * (float)total;
        }
        if (G >= QB) xg[g0 / G] = gs;
    }
}

/* For the int4 tiles: one row of x in blocks of 32 whose scales are the row's scale D = max|x| / 127
 * times a power of two, d_b = D 2^-e_b (e_b in 0..SHIFT_MAX, the largest with max|x_b| 2^e_b <= max|x|),
 * as microscaling formats do. The tiles then scale a block's sum (converted to float, exactly: it
 * is below 2^16) by 2^sh_b, sh_b = SHIFT_MAX - e_b, with an integer add to its exponent bits, and
 * D 2^-SHIFT_MAX (r) multiplies each output once: per block and tile one FMA (by the weight's
 * scale) instead of two, and on Zen 4 the FMAs share their units with vpdpbusd (128-row Q4_0
 * products +8.6%; 512-token prefills of the 1B/2B shapes +6-11% with the shared quantization below:
 * docs/speed.md). A sum of exactly 0 becomes 2^(sh_b - 127) (< 2e-34) instead of 0. The
 * largest block keeps Q8_0's exact scale; a block e_b below it uses 64..127 of the code range
 * instead of 127 (at most one bit of its resolution: SmolLM2's WikiText-2 perplexity +0.05%).
 * Writes codes q, the blocks' code sums bs, sh (as exponent-field increments, sh_b << 23), *r, and
 * per group of G (>= 32) the sums xg[g] = sum_b 2^sh_b sum(q_b) (the zero points' and offsets'
 * terms, in units of r); `amax` is scratch for the blocks' max |x| (the tiles read no d_b). */
enum { SHIFT_MAX = 15 };

static inline int exponent_bits(float f) {  /* f's biased exponent */
    union { float f; uint32_t u; } v = {f};
    return (int)(v.u >> 23 & 0xff);
}

static inline float pow2f(int e) {  /* 2^e, e in -126..127 (exact; no libm in this library) */
    union { uint32_t u; float f; } v = {(uint32_t)(e + 127) << 23};
    return v.f;
}

static void quantize_row_pow2(const void *x, int xkind, long K, long Kp, int G, int8_t *q, float *amax, int *bs,
                              float *xg, int *sh, float *r) {
    const long nb = Kp / 32;
    float rowmax = 0.f;
    for (long b = 0; b < nb; b++) {
        amax[b] = block_absmax(x, xkind, K, 32 * b, 2);
        rowmax = amax[b] > rowmax ? amax[b] : rowmax;
    }
    *r = rowmax / 127.f * pow2f(-SHIFT_MAX);
    float gs = 0.f;
    for (long b = 0; b < nb; b++) {
        int e = SHIFT_MAX;
        if (amax[b] > 0.f) {  /* the exponents' difference, less one where the mantissa says so */
            e = exponent_bits(rowmax) - exponent_bits(amax[b]);
            e = e > SHIFT_MAX ? SHIFT_MAX : e;
            if (e > 0 && amax[b] * pow2f(e) > rowmax) e--;
        }
        bs[b] = block_codes(x, xkind, K, 32 * b, 2, rowmax > 0.f ? 127.f / rowmax * pow2f(e) : 0.f, q, NULL);
        sh[b] = (SHIFT_MAX - e) << 23;
        gs += (float)bs[b] * pow2f(SHIFT_MAX - e);
        if ((b + 1) * 32 % G == 0) {
            xg[(b + 1) * 32 / G - 1] = gs;
            gs = 0.f;
        }
    }
}

/* Form 3's metadata, per tile and super-block of SB_K values: d and dmin (fp16) of its 16 rows,
 * then its 8 groups' scales sc and mins mn as bytes ([8][16] each). */
enum { SB_K = 256, SB_BYTES = 32 + 32 + 128 + 128 };

/* Group g's s = d sc and z = -(dmin mn) of tile `tile`: the fp32 products form 1 stores (exact: at
 * most 17 significant bits), so both forms give the same sums. */
static inline void superblock_meta(const void *meta, long tile, long Kp, int g, __m512 *s, __m512 *z) {
    const uint8_t *p = (const uint8_t *)meta + (tile * (Kp / SB_K) + g / 8) * SB_BYTES;
    const int j = g % 8;
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32)));
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 64 + 16 * j))));
    const __m512 mn = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 192 + 16 * j))));
    *s = _mm512_mul_ps(d, sc);
    *z = _mm512_mul_ps(_mm512_mul_ps(dmin, mn), _mm512_set1_ps(-1.0f));  /* negated exactly, 0 to -0 too */
}

/* NT adjacent int4 tiles (16 or 32 output rows) against MC rows of quantized x: each broadcast of
 * 4 x bytes feeds NT products (pairs of tiles, 4 rows at a time: 380 -> 490 GFLOP/s on 2 Zen 4
 * cores at 128 rows; the broadcasts were a third of the vector instructions). With few rows the
 * low and high nibbles sum in two chains each: vpdpbusd's latency wants more independent chains
 * than MC * NT. x comes in blocks of 32 (one 32-k chunk of the tiles); each block's products
 * gather in nibble sums (avx512_on_avx2.h: 16-bit on AVX2) before its int32 sums.
 * out[n * MC_MAX + m]: tile n, row m. */
static inline __attribute__((always_inline)) void tile_int4(
    const uint8_t *w, const void *sc, const void *zc, long meta0, int mk, int form,
    const int8_t *xq, const int *xh, const float *xr, const int *xs, const float *xg, long Kp, int G, const int MC,
    const int NT, __m512 *out) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const int KG = (int)(Kp / G), bpg = G / 32, CH = INT4_CHAINS(MC, NT);
    const long nb = Kp / 32, tile_bytes = 8 * Kp, tile_meta = 16L * KG;
    __m512 acc[2][MC_MAX];
#pragma GCC unroll 8
    for (int m = 0; m < MC; m++) acc[0][m] = acc[1][m] = _mm512_setzero_ps();
    for (int g = 0; g < KG; g++) {
        __m512 ga[2][MC_MAX];
#pragma GCC unroll 8
        for (int m = 0; m < MC; m++) ga[0][m] = ga[1][m] = _mm512_setzero_ps();
        for (int b = 0; b < bpg; b++) {  /* x blocks of 32: one 32-k chunk of the tiles each */
            const long blk = (long)g * bpg + b, k0 = blk * 32;
            __m512i ia[2][2][MC_MAX], p[2][2][MC_MAX];  /* [tile][chain][row]: int32 sums, nibble sums */
#pragma GCC unroll 8
            for (int m = 0; m < MC; m++)
#pragma GCC unroll 2
                for (int n = 0; n < NT; n++) {
                    /* form 2: the zero point 8 enters as -8 sum(xq_b), exact in int32: no float product per group */
                    ia[n][0][m] = form == 2 ? _mm512_set1_epi32(-8 * xs[m * nb + blk]) : _mm512_setzero_si512();
                    ia[n][1][m] = _mm512_setzero_si512();
                    p[n][0][m] = mc_nibble_start(ia[n][0][m]);
                    p[n][1][m] = mc_nibble_start(ia[n][1][m]);
                }
#pragma GCC unroll 8
            for (int L = 0; L < 4; L++) {
                __m512i lo[2], hi[2];  /* 16 rows x 32 k / 2 bytes = 256 per 32 k of a tile */
#pragma GCC unroll 2
                for (int n = 0; n < NT; n++) {
                    const __m512i v = _mm512_loadu_si512(w + n * tile_bytes + k0 * 8 + 64 * L);
                    lo[n] = _mm512_and_si512(v, m4);
                    hi[n] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                }
#pragma GCC unroll 8
                for (int m = 0; m < MC; m++) {
                    const int8_t *xk = xq + m * Kp + k0 + 4 * L;
                    const __m512i xl = _mm512_set1_epi32(*(const i32u *)xk), xh = _mm512_set1_epi32(*(const i32u *)(xk + 16));
#pragma GCC unroll 2
                    for (int n = 0; n < NT; n++) {
                        p[n][0][m] = mc_nibble_dot(p[n][0][m], lo[n], xl);
                        p[n][CH - 1][m] = mc_nibble_dot(p[n][CH - 1][m], hi[n], xh);
                    }
                }
            }
#pragma GCC unroll 8
            for (int m = 0; m < MC; m++)
#pragma GCC unroll 2
                for (int n = 0; n < NT; n++) {
                    ia[n][0][m] = mc_nibble_end(ia[n][0][m], p[n][0][m]);
                    if (CH == 2) ia[n][1][m] = mc_nibble_end(ia[n][1][m], p[n][1][m]);
                }
#pragma GCC unroll 8
            for (int m = 0; m < MC; m++) {
                const __m512i sh = _mm512_set1_epi32(xh[m * nb + blk]);  /* the x block's 2^sh (quantize_row_pow2) */
#pragma GCC unroll 2
                for (int n = 0; n < NT; n++) {
                    const __m512i sum = CH == 2 ? _mm512_add_epi32(ia[n][0][m], ia[n][1][m]) : ia[n][0][m];
                    const __m512 f = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(sum)), sh));
                    ga[n][m] = bpg == 1 ? f : _mm512_add_ps(ga[n][m], f);
                }
            }
        }
#pragma GCC unroll 2
        for (int n = 0; n < NT; n++) {
            const long meta = meta0 + n * tile_meta + 16L * g;
            __m512 s, z;
            if (form == 3) {
                superblock_meta(sc, meta0 / tile_meta + n, Kp, g, &s, &z);
            } else {
                s = load16(sc, meta, mk);
                z = form == 2 ? _mm512_setzero_ps() : load16(zc, meta, mk);  /* form 2's is in the int sums */
            }
#pragma GCC unroll 8
            for (int m = 0; m < MC; m++) {
                if (form == 1 || form == 3) {  /* z holds m: acc += s ga + m xg */
                    acc[n][m] = _mm512_fmadd_ps(s, ga[n][m], acc[n][m]);
                    acc[n][m] = _mm512_fmadd_ps(z, _mm512_set1_ps(xg[m * KG + g]), acc[n][m]);
                } else if (form == 2) {
                    acc[n][m] = _mm512_fmadd_ps(s, ga[n][m], acc[n][m]);
                } else {
                    ga[n][m] = _mm512_fnmadd_ps(z, _mm512_set1_ps(xg[m * KG + g]), ga[n][m]);
                    acc[n][m] = _mm512_fmadd_ps(s, ga[n][m], acc[n][m]);
                }
            }
        }
    }
#pragma GCC unroll 2
    for (int n = 0; n < NT; n++)
#pragma GCC unroll 8
        for (int m = 0; m < MC; m++) out[n * MC_MAX + m] = _mm512_mul_ps(acc[n][m], _mm512_set1_ps(xr[m]));
}

/* Bits 4-5 of the Q6_K codes for load L (0..3) of a 32-k chunk, in place in every byte: byte b of a
 * lane of h holds them for k = 4L + b at bits 2L, 2L + 1 (the mask drops what a shift carries in). */
static inline __m512i q6_high(__m512i h, const int L) {
    const __m512i m = _mm512_set1_epi8(0x30);
    if (L == 2) return _mm512_and_si512(h, m);
    return _mm512_and_si512(L < 2 ? _mm512_slli_epi32(h, 4 - 2 * L) : _mm512_srli_epi32(h, 2), m);
}

/* Q6_K's metadata, per tile and super-block of SB_K values: d (fp16) of its 16 rows, then the int8
 * scales sc [16][16] (one per 16 values). */
enum { Q6_SB_BYTES = 32 + 256 };

/* 16 rows of a Q6_K tile, w = d sc (q - 32) with 6-bit q, against MC rows of quantized x. Per 32 k
 * of a tile: the int4 layout's 4 nibble loads (bits 0-3), then 2 loads of bits 4-5 (load P: k
 * 16P + 4L + b, see q6_high): 12 bytes per 16 weights, 0.82 bytes a weight with the metadata, as
 * GGUF stores it (int8 codes with fp32 scales: 1.25). The low and high nibbles of a load are k 0..15
 * and 16..31 of the chunk: the two scale groups. */
static inline __attribute__((always_inline)) void tile_int6(
    const uint8_t *w, const uint8_t *meta, const int8_t *xq, const float *xd, const float *xg, long Kp,
    const int MC, __m512 *out) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512 c32 = _mm512_set1_ps(32.f);
    const long nb = Kp / 32, KG = Kp / 16;
    __m512 acc[MC_MAX], d = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int m = 0; m < MC; m++) acc[m] = _mm512_setzero_ps();
    for (long blk = 0; blk < nb; blk++) {
        const uint8_t *wp = w + blk * 384, *sb = meta + blk / 8 * Q6_SB_BYTES;
        if (blk % 8 == 0) d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sb));
        const __m512i h0 = _mm512_loadu_si512(wp + 256), h1 = _mm512_loadu_si512(wp + 320);
        __m512i ia[2][MC_MAX];  /* [half][row] */
#pragma GCC unroll 8
        for (int m = 0; m < MC; m++) ia[0][m] = ia[1][m] = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int L = 0; L < 4; L++) {
            const __m512i v = _mm512_loadu_si512(wp + 64 * L);
            const __m512i lo = _mm512_add_epi32(_mm512_and_si512(v, m4), q6_high(h0, L));  /* bytes: no carries */
            const __m512i hi = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi16(v, 4), m4), q6_high(h1, L));
#pragma GCC unroll 8
            for (int m = 0; m < MC; m++) {
                const int8_t *xk = xq + m * Kp + blk * 32 + 4 * L;
                ia[0][m] = mc_dpbusd_small_epi32(ia[0][m], lo, _mm512_set1_epi32(*(const i32u *)xk));
                ia[1][m] = mc_dpbusd_small_epi32(ia[1][m], hi, _mm512_set1_epi32(*(const i32u *)(xk + 16)));
            }
        }
        const int8_t *sc = (const int8_t *)sb + 32 + 32 * (blk % 8);  /* groups 2 (blk % 8) and the next */
        const __m512 s0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)sc))));
        const __m512 s1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(sc + 16)))));
#pragma GCC unroll 8
        for (int m = 0; m < MC; m++) {
            const __m512 dx = _mm512_set1_ps(xd[m * nb + blk]);
            const float *g = xg + m * KG + 2 * blk;
            acc[m] = _mm512_fmadd_ps(s0, _mm512_fnmadd_ps(c32, _mm512_set1_ps(g[0]),
                                                          _mm512_mul_ps(_mm512_cvtepi32_ps(ia[0][m]), dx)), acc[m]);
            acc[m] = _mm512_fmadd_ps(s1, _mm512_fnmadd_ps(c32, _mm512_set1_ps(g[1]),
                                                          _mm512_mul_ps(_mm512_cvtepi32_ps(ia[1][m]), dx)), acc[m]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MC; m++) out[m] = acc[m];
}

/* 16 rows of an int8 tile (codes + 128, per-row scale) against MC rows of quantized x. */
static inline __attribute__((always_inline)) void tile_int8(
    const uint8_t *w, const void *sc, long meta0, int mk,
    const int8_t *xq, const float *xd, const float *xg, long Kp, int QB, const int MC, __m512 *out) {
    const int cpb = QB / 32;
    const long nb = Kp / QB;
    __m512 ga[MC_MAX];
#pragma GCC unroll 8
    for (int m = 0; m < MC; m++) ga[m] = _mm512_setzero_ps();
    for (long blk = 0; blk < nb; blk++) {
        __m512i a0[MC_MAX], a1[MC_MAX];
#pragma GCC unroll 8
        for (int m = 0; m < MC; m++) a0[m] = a1[m] = _mm512_setzero_si512();
        for (int c = 0; c < cpb; c++) {
            const long k0 = (blk * cpb + c) * 32;
            const uint8_t *wp = w + k0 * 16;  /* 16 rows x 32 k bytes = 512 per 32 k */
#pragma GCC unroll 8
            for (int L = 0; L < 8; L += 2) {
                __m512i v0 = _mm512_loadu_si512(wp + 64 * L), v1 = _mm512_loadu_si512(wp + 64 * L + 64);
                if (PF_DIST) {
                    _mm_prefetch((const char *)wp + 64 * L + PF_DIST, _MM_HINT_T0);
                    _mm_prefetch((const char *)wp + 64 * L + 64 + PF_DIST, _MM_HINT_T0);
                }
#pragma GCC unroll 8
                for (int m = 0; m < MC; m++) {
                    const int8_t *xk = xq + m * Kp + k0 + 4 * L;
                    a0[m] = mc_dpbusd_int8_epi32(a0[m], v0, _mm512_set1_epi32(*(const i32u *)xk));
                    a1[m] = mc_dpbusd_int8_epi32(a1[m], v1, _mm512_set1_epi32(*(const i32u *)(xk + 4)));
                }
            }
        }
#pragma GCC unroll 8
        for (int m = 0; m < MC; m++)
            ga[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0[m], a1[m])),
                                    _mm512_set1_ps(xd[m * nb + blk]), ga[m]);
    }
    const __m512 s = load16(sc, meta0, mk), c128 = _mm512_set1_ps((float)MC_INT8_OFFSET);
#pragma GCC unroll 8
    for (int m = 0; m < MC; m++)
        out[m] = _mm512_mul_ps(s, MC_INT8_OFFSET ? _mm512_fnmadd_ps(c128, _mm512_set1_ps(xg[m]), ga[m]) : ga[m]);
}

/* 16 rows of an int8 tile with a scale per group of G (16, or a multiple of 32) along k. */
static inline __attribute__((always_inline)) void tile_int8g(
    const uint8_t *w, const void *sc, long meta0, int mk,
    const int8_t *xq, const float *xd, const float *xg, long Kp, int G, const int MC, __m512 *out) {
    const long nb = Kp / 32, KG = Kp / G;
    const int bpg = G < 32 ? 1 : G / 32, halves = G < 32;
    const __m512 c128 = _mm512_set1_ps((float)MC_INT8_OFFSET);
    __m512 acc[MC_MAX];
#pragma GCC unroll 8
    for (int m = 0; m < MC; m++) acc[m] = _mm512_setzero_ps();
    for (long g = 0; g < nb / bpg; g++) {
        __m512 ga[2][MC_MAX];  /* [half][row]: per 16 k when halves, else the whole group in [0] */
#pragma GCC unroll 8
        for (int m = 0; m < MC; m++) ga[0][m] = ga[1][m] = _mm512_setzero_ps();
        for (int b = 0; b < bpg; b++) {
            const long blk = g * bpg + b, k0 = blk * 32;
            const uint8_t *wp = w + k0 * 16;
            __m512i a[2][2][MC_MAX];  /* [half][chain][row] */
#pragma GCC unroll 8
            for (int m = 0; m < MC; m++) a[0][0][m] = a[0][1][m] = a[1][0][m] = a[1][1][m] = _mm512_setzero_si512();
#pragma GCC unroll 8
            for (int L = 0; L < 8; L += 2) {
                const int h = L >> 2;  /* loads 0-3: k 0..15, loads 4-7: k 16..31 */
                __m512i v0 = _mm512_loadu_si512(wp + 64 * L), v1 = _mm512_loadu_si512(wp + 64 * L + 64);
#pragma GCC unroll 8
                for (int m = 0; m < MC; m++) {
                    const int8_t *xk = xq + m * Kp + k0 + 4 * L;
                    a[h][0][m] = mc_dpbusd_int8_epi32(a[h][0][m], v0, _mm512_set1_epi32(*(const i32u *)xk));
                    a[h][1][m] = mc_dpbusd_int8_epi32(a[h][1][m], v1, _mm512_set1_epi32(*(const i32u *)(xk + 4)));
                }
            }
#pragma GCC unroll 8
            for (int m = 0; m < MC; m++) {
                const __m512 d = _mm512_set1_ps(xd[m * nb + blk]);
                const __m512i s0 = _mm512_add_epi32(a[0][0][m], a[0][1][m]), s1 = _mm512_add_epi32(a[1][0][m], a[1][1][m]);
                if (halves) {
                    ga[0][m] = _mm512_mul_ps(_mm512_cvtepi32_ps(s0), d);
                    ga[1][m] = _mm512_mul_ps(_mm512_cvtepi32_ps(s1), d);
                } else {
                    ga[0][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), d, ga[0][m]);
                }
            }
        }
        for (int h = 0; h <= halves; h++) {
            const long gi = g * (halves + 1) + h;  /* the scale group */
            const __m512 s = load16(sc, meta0 + 16 * gi, mk);
#pragma GCC unroll 8
            for (int m = 0; m < MC; m++)
                acc[m] = _mm512_fmadd_ps(s, MC_INT8_OFFSET ? _mm512_fnmadd_ps(c128, _mm512_set1_ps(xg[m * KG + gi]), ga[h][m])
                                                           : ga[h][m], acc[m]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MC; m++) out[m] = acc[m];
}

/* NT tiles (int4; int8: NT = 1): int4 (zero points or offsets), int8 per row (G == Kp, as qgemm
 * sets it) or per group. */
static inline __attribute__((always_inline)) void run_tile(
    int bits, int form, const uint8_t *w, const void *sc, const void *zc, long t, int mk,
    const int8_t *xq, const float *xd, const int *xs, const int *xh, const float *xr, const float *xg, long Kp,
    int G, int QB, const int MC, const int NT, __m512 *out) {
    if (bits == 6)
        tile_int6(w + t * 12 * Kp, (const uint8_t *)sc + t * (Kp / SB_K) * Q6_SB_BYTES, xq, xd, xg, Kp, MC, out);
    else if (bits == 4 && form == 2 && G == 32)  /* GGUF's Q4_0: form and group constants, the block loop folds */
        tile_int4(w + t * 8 * Kp, sc, zc, t * 16 * (Kp / 32), mk, 2, xq, xh, xr, xs, xg, Kp, 32, MC, NT, out);
    else if (bits == 4 && G == 32)  /* one x block a group (Q4_1, Q4_K) */
        tile_int4(w + t * 8 * Kp, sc, zc, t * 16 * (Kp / 32), mk, form, xq, xh, xr, xs, xg, Kp, 32, MC, NT, out);
    else if (bits == 4)
        tile_int4(w + t * 8 * Kp, sc, zc, t * 16 * (Kp / G), mk, form, xq, xh, xr, xs, xg, Kp, G, MC, NT, out);
    else if (G == Kp)
        tile_int8(w + t * 16 * Kp, sc, t * 16, mk, xq, xd, xg, Kp, QB, MC, out);
    else if (G == 16)  /* a constant: the halves' loops unroll */
        tile_int8g(w + t * 16 * Kp, sc, t * 16 * (Kp / 16), mk, xq, xd, xg, Kp, 16, MC, out);
    else if (G == 32)  /* GGUF's Q8_0 and Q5_0: a constant group (128 rows, Zen 4: 338 -> 531 GFLOP/s) */
        tile_int8g(w + t * 16 * Kp, sc, t * 16 * (Kp / 32), mk, xq, xd, xg, Kp, 32, MC, out);
    else
        tile_int8g(w + t * 16 * Kp, sc, t * 16 * (Kp / G), mk, xq, xd, xg, Kp, G, MC, out);
}

int qgemm_abi_version(void) { return 9; }

/* x quantized for the tiles: int8 codes [M][Kp], block scales [M][Kp/QB] (int4: quantize_row_pow2's
 * scratch), group sums [M][Kp/G], the blocks' integer code sums [M][Kp/QB]; for int4 the blocks'
 * shifts [M][Kp/QB] and the rows' scales [M] */
struct qx {
    int8_t *q;
    float *d, *g, *r;
    int *s, *h;
};

/* Bytes of scratch for M rows of quantized x, laid out by qx_in (64 of slack to align the codes). */
static size_t qx_bytes(long M, long Kp, int QB, int G) {
    return ((size_t)M * Kp + 63) / 64 * 64 + sizeof(float) * (size_t)M * (Kp / QB + Kp / G + 1)
           + sizeof(int) * (size_t)M * (2 * (Kp / QB)) + 64;
}

static struct qx qx_in(void *scratch, long M, long Kp, int QB, int G) {
    struct qx t;
    t.q = (int8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    t.d = (float *)(t.q + ((size_t)M * Kp + 63) / 64 * 64);
    t.g = t.d + (size_t)M * (Kp / QB);
    t.r = t.g + (size_t)M * (Kp / G);
    t.s = (int *)(t.r + M);
    t.h = t.s + (size_t)M * (Kp / QB);
    return t;
}

/* Row `row` of x with its columns in the weight's stored order: out[j] = row[perm[j]] (GPTQ
 * act-order layers store their columns sorted by group). */
static const void *gather_row(const void *row, int xkind, long K, const int64_t *perm, void *out) {
    if (xkind == K_F32) {
        const float *in = (const float *)row;
        float *o = (float *)out;
        for (long j = 0; j < K; j++) o[j] = in[perm[j]];
    } else {
        const uint16_t *in = (const uint16_t *)row;
        uint16_t *o = (uint16_t *)out;
        for (long j = 0; j < K; j++) o[j] = in[perm[j]];
    }
    return out;
}

/* qx_bytes rounded up to 64: where a gathered row starts in a scratch that holds both. */
static size_t qx_span(long M, long Kp, int QB, int G) {
    return (qx_bytes(M, Kp, QB, G) + 63) & ~(size_t)63;
}

/* Bytes of one row of x gathered (gather_row's `out`): none without a permutation. */
static size_t gather_bytes(const int64_t *perm, long K) {
    return perm ? ((size_t)K * 4 + 63) / 64 * 64 : 0;
}

/* Rows [m0, m1) of x quantized into t; `perm` (or NULL): x's columns are gathered into the
 * weight's order first, through `buffer` (gather_bytes), which costs a pass over the row where
 * an index_select would cost a copy of x and a call. */
static void quantize_rows(int bits, const struct qx *t, const void *x, int xkind, long m0, long m1, long K,
                          long Kp, int QB, int G, const int64_t *perm, void *buffer) {
    const size_t xrow = (size_t)K * (xkind == K_F32 ? 4 : 2);
    const long nb = Kp / QB, KG = Kp / G;
    for (long m = m0; m < m1; m++) {
        const void *row = (const char *)x + m * xrow;
        if (perm) row = gather_row(row, xkind, K, perm, buffer);
        if (bits == 4)  /* QB is 32 (group_of) */
            quantize_row_pow2(row, xkind, K, Kp, G, t->q + m * Kp, t->d + m * nb, t->s + m * nb, t->g + m * KG,
                              t->h + m * nb, t->r + m);
        else
            quantize_row(row, xkind, K, Kp, QB, G, t->q + m * Kp, t->d + m * nb, t->s + m * nb, t->g + m * KG);
    }
}

/* Rows [m0, m0 + mc) of y for NT tiles from t, through run_tile with a constant row count (the row
 * loops unroll and stay in registers; mc <= MC_MAX, and <= PAIR_MC for pairs). */
static inline __attribute__((always_inline)) void tile_rows(
    int bits, const struct qx *in, long m0, long mc, long Kp, long N, int G, int QB, const uint8_t *w,
    const void *sc, const void *zc, int mk, const void *bias, int bkind, void *y, int ykind, int form, long t,
    const int NT) {
    const long nb = Kp / QB, KG = Kp / G;
    const int8_t *xq = in->q + m0 * Kp;
    const float *xd = in->d + m0 * nb, *xg = in->g + m0 * KG;
    const int *xs = in->s + m0 * nb, *xh = in->h + m0 * nb;
    const float *xr = in->r + m0;
    __m512 out[2 * MC_MAX];
    switch (mc) {
#if MC_MAX >= 6
    case 6: run_tile(bits, form, w, sc, zc, t, mk, xq, xd, xs, xh, xr, xg, Kp, G, QB, 6, NT, out); break;
    case 5: run_tile(bits, form, w, sc, zc, t, mk, xq, xd, xs, xh, xr, xg, Kp, G, QB, 5, NT, out); break;
#endif
    case 4: run_tile(bits, form, w, sc, zc, t, mk, xq, xd, xs, xh, xr, xg, Kp, G, QB, 4, NT, out); break;
    case 3: run_tile(bits, form, w, sc, zc, t, mk, xq, xd, xs, xh, xr, xg, Kp, G, QB, 3, NT, out); break;
    case 2: run_tile(bits, form, w, sc, zc, t, mk, xq, xd, xs, xh, xr, xg, Kp, G, QB, 2, NT, out); break;
    default: run_tile(bits, form, w, sc, zc, t, mk, xq, xd, xs, xh, xr, xg, Kp, G, QB, 1, NT, out); break;
    }
    for (int n = 0; n < NT; n++) {
        const __mmask16 km = tail_mask(N - 16 * (t + n));
        const __m512 bv = bias ? load16_mask(bias, 16 * (t + n), bkind, km) : _mm512_setzero_ps();
        for (long m = 0; m < mc; m++)
            store16_mask(y, (m0 + m) * N + 16 * (t + n), ykind, _mm512_add_ps(out[n * MC_MAX + m], bv), km);
    }
}

/* Output tiles [t0, t1) of y for every row of the quantized x: int4 tiles in pairs (the last one
 * alone), PAIR_MC rows a pass, from PAIR_ROWS rows; a single tile MC_MAX rows a pass. */
static void tiles(int bits, const struct qx *in, long M, long Kp, long N, int G, int QB, const uint8_t *w,
                  const void *sc, const void *zc, int mk, const void *bias, int bkind, void *y, int ykind,
                  int form, long t0, long t1) {
    for (long mb = 0; mb < M; mb += MB) {
        const long me = mb + MB < M ? mb + MB : M;
        long t = t0;
        for (; bits == 4 && M >= PAIR_ROWS && t + 1 < t1; t += 2)
            for (long m0 = mb; m0 < me; m0 += PAIR_MC)
                tile_rows(bits, in, m0, me - m0 < PAIR_MC ? me - m0 : PAIR_MC, Kp, N, G, QB, w, sc, zc, mk, bias,
                          bkind, y, ykind, form, t, 2);
        for (; t < t1; t++)
            for (long m0 = mb; m0 < me; m0 += MC_MAX)
                tile_rows(bits, in, m0, me - m0 < MC_MAX ? me - m0 : MC_MAX, Kp, N, G, QB, w, sc, zc, mk, bias,
                          bkind, y, ykind, form, t, 1);
    }
}

/* int8 with a scale per row is G = Kp; 0 where (bits, G, QB, form) is a layout the tiles do not take. */
static int group_of(int bits, int G, int QB, long Kp, int form) {
    if (form == 3)  /* GGUF's super-blocks: Q4_K (bits 4, groups of 32), Q6_K (bits 6, groups of 16) */
        return QB == 32 && Kp % SB_K == 0 && ((bits == 4 && G == 32) || (bits == 6 && G == 16)) ? G : 0;
    if (bits == 6) return 0;
    if (bits == 4) return QB == 32 && G % 32 == 0 ? G : 0;  /* tile_int4 reads x in blocks of 32 */
    if (bits == 8 && G <= 0) return (int)Kp;
    if (bits == 8 && G != Kp && (QB != 32 || (G != 16 && G % 32))) return 0;
    return G;
}

/* y[M, N] = x[M, K] @ W.T + bias. Kp: K padded to the weight layout (a multiple of QB and G);
 * int8: G = 0 for a scale per row, else per group (16 or a multiple of QB = 32). form (int4):
 * 0 zc holds zero points, 1 offsets, 2 none (the zero point is 8). Returns 0, or -1 when scratch memory is short. */
static int qgemm_gather(int bits, const void *x, int xkind, long M, long K, long Kp, long N, int G, int QB,
                        const uint8_t *w, const void *sc, const void *zc, int mk, const void *bias, int bkind,
                        void *y, int nthreads, int form, const int64_t *perm) {
    if (!(G = group_of(bits, G, QB, Kp, form))) return -2;
    const long T = (N + 15) / 16;
    if (nthreads < 1) nthreads = 1;
    if (T < nthreads) nthreads = (int)T;
    const size_t xbytes = qx_span(M, Kp, QB, G), gbytes = gather_bytes(perm, K);
    char *scratch = malloc(xbytes + gbytes * nthreads);  /* x quantized, then a gather row per thread */
    if (!scratch) return -1;
    const struct qx t = qx_in(scratch, M, Kp, QB, G);
    /* a few rows are quantized before forking: one barrier less per decode call */
    const int serial_quant = M * Kp <= 16384;
    if (serial_quant) quantize_rows(bits, &t, x, xkind, 0, M, K, Kp, QB, G, perm, scratch + xbytes);
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        if (!serial_quant) {
            quantize_rows(bits, &t, x, xkind, M * tid / nt, M * (tid + 1) / nt, K, Kp, QB, G, perm,
                          scratch + xbytes + gbytes * tid);
#pragma omp barrier
        }
        tiles(bits, &t, M, Kp, N, G, QB, w, sc, zc, mk, bias, bkind, y, xkind, form, T * tid / nt, T * (tid + 1) / nt);
    }
    free(scratch);
    return 0;
}

int qgemm(int bits, const void *x, int xkind, long M, long K, long Kp, long N, int G, int QB,
          const uint8_t *w, const void *sc, const void *zc, int mk,
          const void *bias, int bkind, void *y, int nthreads, int form) {
    return qgemm_gather(bits, x, xkind, M, K, Kp, N, G, QB, w, sc, zc, mk, bias, bkind, y, nthreads, form, NULL);
}

/* A layer's fixed arguments, built once per layer in Python: a decode step makes hundreds of
 * calls, and converting 17 ctypes arguments each time costs more than a small GEMV. */
struct qplan {
    int bits, G, QB, mk, bkind, pad;
    long K, Kp, N;
    const uint8_t *w;
    const void *sc, *zc, *bias;
    int form, pad2;  /* appended (ABI 3): int4 zero points (0) or offsets (1) in zc; (ABI 5) 2: zero point 8, no zc;
                        (ABI 6) 3: Q4_K super-blocks, all metadata in sc (superblock_meta) */
    const int64_t *perm;  /* (ABI 9) or NULL: stored column j multiplies x's column perm[j] (GPTQ act-order) */
};

int qgemm_plan(const struct qplan *p, const void *x, int xkind, long M, void *y, int nthreads) {
    return qgemm_gather(p->bits, x, xkind, M, p->K, p->Kp, p->N, p->G, p->QB, p->w, p->sc, p->zc, p->mk,
                        p->bias, p->bkind, y, nthreads, p->form, p->perm);
}

/* Bytes of scratch qgemm_plan_team needs for M rows (per thread): x quantized, then a gathered row. */
long qgemm_plan_scratch(const struct qplan *p, long M) {
    const int G = group_of(p->bits, p->G, p->QB, p->Kp, p->form);
    return G ? (long)(qx_span(M, p->Kp, p->QB, G) + gather_bytes(p->perm, p->K)) : 0;
}

/* Whether x quantized for plan a is x quantized for plan b: the same codes, scales and sums. */
static int same_quantized_x(const struct qplan *a, const struct qplan *b) {
    return (a->bits == 4) == (b->bits == 4) && a->perm == b->perm && a->K == b->K && a->Kp == b->Kp && a->QB == b->QB
           && group_of(a->bits, a->G, a->QB, a->Kp, a->form) == group_of(b->bits, b->G, b->QB, b->Kp, b->form);
}

#define SHARED_ROWS 16  /* from this many rows the team quantizes x once, each thread a share, then waits */

/* Thread tid's share of qgemm_plan, inside a parallel region the caller opened: no region, no
 * allocation. Below SHARED_ROWS rows each thread quantizes all of x into its own scratch (of
 * qgemm_plan_scratch bytes), with no barrier: redundant, but cheaper than a barrier at decode
 * sizes. From SHARED_ROWS (a prompt chunk) the threads quantize their shares of the rows into
 * `shared` (one thread's scratch, the same pointer on every thread) and meet at a barrier; the
 * caller must pass a barrier before `shared` is written again (decode.c: every new x is made by
 * the whole team). `held`: the plan of this thread's previous call on the same x and M (q, k and v
 * of one input; gate and up), or NULL; where its quantized x is this plan's, it is used again, else
 * quantized afresh (after a barrier, in `shared`)
 * (prefill of MiniCPM-1B: quantizing x was 5% of the time, each input quantized 2-3 times on
 * each thread). */
int qgemm_plan_team(const struct qplan *p, const void *x, int xkind, long M, void *y, int tid, int nt,
                    void *scratch, const struct qplan *held, void *shared) {
    const int G = group_of(p->bits, p->G, p->QB, p->Kp, p->form);
    if (!G) return -2;
    const long T = (p->N + 15) / 16;
    const int team = M >= SHARED_ROWS && nt > 1 && shared;
    const struct qx t = qx_in(team ? shared : scratch, M, p->Kp, p->QB, G);
    /* this thread's gathered row: its own scratch, past the quantized x (shared is one thread's scratch) */
    char *gather = (char *)scratch + qx_span(M, p->Kp, p->QB, G);
    if (!held || !same_quantized_x(held, p)) {
        if (team) {
            if (held) {  /* the team may still be reading the previous plan's x (v Q6_K after k Q4_K) */
#pragma omp barrier
            }
            quantize_rows(p->bits, &t, x, xkind, M * tid / nt, M * (tid + 1) / nt, p->K, p->Kp, p->QB, G, p->perm,
                          gather);
#pragma omp barrier
        } else {
            quantize_rows(p->bits, &t, x, xkind, 0, M, p->K, p->Kp, p->QB, G, p->perm, gather);
        }
    }
    tiles(p->bits, &t, M, p->Kp, p->N, G, p->QB, p->w, p->sc, p->zc, p->mk, p->bias, p->bkind, y, xkind, p->form,
          T * tid / nt, T * (tid + 1) / nt);
    return 0;
}
