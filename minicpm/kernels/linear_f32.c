// y = x W^T (+ bias) for fp32 x [M, K] with small M (decoding), fp32 W [N, K], on CPU.
//
// Why not F.linear: MKL picks its kernel by M (a GEMV for one row, blocked GEMMs for more) and
// sums each output in a different order, so a sequence's logits change with how many others
// are decoded beside it. Here every output y[m, n] is one fixed sum: 16-lane fp32 partial sums
// over k in order (fused multiply-adds), then one horizontal add, then the bias. How rows of x
// and W are grouped into register blocks only changes the speed, never that sum, so a row's
// result is bitwise the same for any M. Blocks of W rows are read side by side (a weight stream,
// as linear_bf16.c does), so at M = 1 the product runs at memory speed.

#include <immintrin.h>
#include "avx512_on_avx2.h"
#include <omp.h>
#include <stdint.h>

int minicpm_linear_f32_abi(void) { return 2; }

enum { ROWS = 16 };  // W rows per parallel task

static inline __mmask16 lanes(int64_t left) { return left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1); }

// y rows [m0, m0 + MM) x columns [n0, n0 + RR); RR and MM are compile-time constants at each
// call below, so the accumulators stay in registers.
static inline __attribute__((always_inline)) void tile(const float *x, const float *w, const float *bias,
                                                       float *y, int64_t k, int64_t n, int64_t n0, int64_t m0,
                                                       const int RR, const int MM) {
    __m512 acc[RR][MM];
    for (int r = 0; r < RR; r++)
        for (int m = 0; m < MM; m++) acc[r][m] = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
        const __mmask16 on = lanes(k - i);
        __m512 xs[MM];
        for (int m = 0; m < MM; m++) xs[m] = _mm512_maskz_loadu_ps(on, x + (m0 + m) * k + i);
        for (int r = 0; r < RR; r++) {
            const __m512 wr = _mm512_maskz_loadu_ps(on, w + (n0 + r) * k + i);
            for (int m = 0; m < MM; m++) acc[r][m] = _mm512_fmadd_ps(wr, xs[m], acc[r][m]);
        }
    }
    for (int r = 0; r < RR; r++)
        for (int m = 0; m < MM; m++) {
            float s = _mm512_reduce_add_ps(acc[r][m]);
            if (bias) s += bias[n0 + r];
            y[(m0 + m) * n + n0 + r] = s;
        }
}

// W rows [r, r + RR) against x rows [m0, m0 + mm), mm <= 4 (constant block shapes for tile)
static void tiles(const float *x, const float *w, const float *bias, float *y, int64_t k, int64_t n, int64_t r,
                  int64_t m0, int64_t mm, const int RR) {
    switch (mm) {
    case 4: tile(x, w, bias, y, k, n, r, m0, RR, 4); break;
    case 3: tile(x, w, bias, y, k, n, r, m0, RR, 3); break;
    case 2: tile(x, w, bias, y, k, n, r, m0, RR, 2); break;
    default: tile(x, w, bias, y, k, n, r, m0, RR, 1);
    }
}

// All of y's rows for W rows [n0, n0 + rows): one x row against 16 W rows (the decode case: a
// pure stream of W), else up to 4 x rows against 4 W rows (16 accumulators: no spills).
static void task(const float *x, const float *w, const float *bias, float *y, int64_t m, int64_t k, int64_t n,
                 int64_t n0, int rows) {
    if (m == 1 && rows == ROWS) {
        tile(x, w, bias, y, k, n, n0, 0, ROWS, 1);
        return;
    }
    for (int64_t m0 = 0; m0 < m; m0 += 4) {
        const int64_t mm = m - m0 < 4 ? m - m0 : 4;
        int64_t r = n0;
        for (; r + 4 <= n0 + rows; r += 4) tiles(x, w, bias, y, k, n, r, m0, mm, 4);
        for (; r < n0 + rows; r++) tiles(x, w, bias, y, k, n, r, m0, mm, 1);
    }
}

// Thread tid's share of the blocks of 16 W rows (of nt), inside a caller's parallel region.
void minicpm_linear_f32_team(const float *x, int64_t m, int64_t k, const float *w, int64_t n, const float *bias,
                             float *y, int tid, int nt) {
    const int64_t blocks = (n + ROWS - 1) / ROWS;
    for (int64_t b = blocks * tid / nt; b < blocks * (tid + 1) / nt; b++) {
        const int64_t n0 = b * ROWS;
        task(x, w, bias, y, m, k, n, n0, n - n0 < ROWS ? (int)(n - n0) : ROWS);
    }
}

void minicpm_linear_f32(const float *x, int64_t m, int64_t k, const float *w, int64_t n, const float *bias,
                        float *y, int threads) {
#pragma omp parallel num_threads(threads)
    minicpm_linear_f32_team(x, m, k, w, n, bias, y, omp_get_thread_num(), omp_get_num_threads());
}
