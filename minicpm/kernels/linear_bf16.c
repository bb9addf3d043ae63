// y = x W^T (+ bias) for bf16 x [M, K] with small M (decoding), bf16 W [N, K], on CPU.
//
// At batch 1 every weight is used once, so the product is a stream through W: PyTorch's bf16
// GEMV (oneDNN) reads it at roughly half of what the memory delivers on our 2-core machine.
// Here sixteen rows of W are read side by side and multiplied with AVX-512 BF16 dot products
// (vdpbf16ps: 32 products into 16 fp32 sums; two FMAs on AVX2), accumulating in fp32 as F.linear does. The
// weight is used as stored (no repacking), so memory-mapped checkpoints stay shared.

#include <immintrin.h>
#define MC_NEEDS_BF16  /* vdpbf16ps: emulated below AVX-512 BF16 */
#include "avx512_on_avx2.h"
#include <omp.h>
#include <stdint.h>
#include <string.h>

int minicpm_linear_bf16_abi(void) { return 2; }

static inline uint16_t to_bf16(float f) {  // round to nearest even, as PyTorch's cast does
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// 16 rows at once: 4 or 8 left the stream short of bandwidth (19-22 vs 22-26 GB/s, 2 threads)
enum { ROWS = 16, MAXM = 4 };

// rows [n0, n0 + rows) of y for rows [m0, m0 + mm) of x
static void block(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t k,
                  int64_t n, int64_t n0, int rows, int64_t m0, int mm) {
    __m512 acc[ROWS][MAXM];
    for (int r = 0; r < ROWS; r++)
        for (int m = 0; m < MAXM; m++) acc[r][m] = _mm512_setzero_ps();
    int64_t i = 0;
    if (rows == ROWS && mm == 1) {  // the decode case: plain loads, no masks
        for (; i + 32 <= k; i += 32) {
            __m512i x0 = _mm512_loadu_si512(x + m0 * k + i);
            for (int r = 0; r < ROWS; r++)
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], MC_BH(_mm512_loadu_si512(w + (n0 + r) * k + i)), MC_BH(x0));
        }
    }
    for (; i < k; i += 32) {
        __mmask32 lanes = k - i >= 32 ? 0xffffffffu : (__mmask32)((1u << (k - i)) - 1);
        __m512i xs[MAXM];
        for (int m = 0; m < mm; m++) xs[m] = _mm512_maskz_loadu_epi16(lanes, x + (m0 + m) * k + i);
        for (int r = 0; r < rows; r++) {
            __m512i wr = _mm512_maskz_loadu_epi16(lanes, w + (n0 + r) * k + i);
            for (int m = 0; m < mm; m++)
                acc[r][m] = _mm512_dpbf16_ps(acc[r][m], MC_BH(wr), MC_BH(xs[m]));
        }
    }
    for (int r = 0; r < rows; r++)
        for (int m = 0; m < mm; m++) {
            float s = _mm512_reduce_add_ps(acc[r][m]);
            if (bias) s += from_bf16(bias[n0 + r]);
            y[(m0 + m) * n + n0 + r] = to_bf16(s);
        }
}

// Thread tid's share of the blocks of 16 W rows (of nt), inside a caller's parallel region.
void minicpm_linear_bf16_team(const uint16_t *x, int64_t m, int64_t k, const uint16_t *w, int64_t n,
                              const uint16_t *bias, uint16_t *y, int tid, int nt) {
    const int64_t blocks = (n + ROWS - 1) / ROWS;
    for (int64_t b = blocks * tid / nt; b < blocks * (tid + 1) / nt; b++) {
        const int64_t n0 = b * ROWS;
        const int rows = n - n0 < ROWS ? (int)(n - n0) : ROWS;
        for (int64_t m0 = 0; m0 < m; m0 += MAXM)
            block(x, w, bias, y, k, n, n0, rows, m0, m - m0 < MAXM ? (int)(m - m0) : MAXM);
    }
}

void minicpm_linear_bf16(const uint16_t *x, int64_t m, int64_t k, const uint16_t *w, int64_t n,
                         const uint16_t *bias, uint16_t *y, int threads) {
#pragma omp parallel num_threads(threads)
    minicpm_linear_bf16_team(x, m, k, w, n, bias, y, omp_get_thread_num(), omp_get_num_threads());
}
