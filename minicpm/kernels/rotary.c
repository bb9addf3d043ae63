/* Rotary position embedding, forward and backward, in one pass each.
 *
 * model.apply_rotary is five PyTorch passes over q and k (a cast to fp32, rotate_half's cat of a
 * negated half, two products, a sum, a cast back), and autograd runs as many again backwards:
 * in a LoRA step of SmolLM2 they were several percent of the step. Here each row of D values
 * is read once and written once. The arithmetic is the Python expression's, operation for
 * operation in fp32 (this file is compiled with -ffp-contract=off, so a product and a sum round
 * separately, as PyTorch's separate ops do), so the results are bitwise the same:
 *   forward   y[i] = x[i] c[i] + (-x[i + h]) s[i],  y[i + h] = x[i + h] c[i + h] + x[i] s[i + h]
 *   backward  dx[i] = g[i] c[i] + (g s)[i + h],     dx[i + h] = g[i + h] c[i + h] + (-(g s)[i])
 * (h = D / 2; the backward is autograd's: the cat and the negation give rotate_half's transpose).
 * x, y, g and dx are fp32 or bf16 (rounded to nearest even, as PyTorch casts), any strides over
 * [B, H, S] with D contiguous; cos and sin fp32 [B or 1, S, D].
 * Plain C: GCC vectorizes the row loops for the machine it runs on.
 */
#include <omp.h>
#include <stdint.h>
#include <string.h>

enum { K_F32 = 0, K_BF16 = 1 };

int minicpm_rotary_abi(void) { return 1; }

static inline float widen(const void *p, int64_t i, int kind) {
    if (kind == K_F32) return ((const float *)p)[i];
    const uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline void store(void *p, int64_t i, float f, int kind) {
    if (kind == K_F32) {
        ((float *)p)[i] = f;
        return;
    }
    uint32_t u;
    memcpy(&u, &f, 4);
    u = f != f ? u | 0x00400000u : u + 0x7fffu + ((u >> 16) & 1u);  /* a NaN stays a (quiet) NaN */
    ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
}

/* One row: backward = 0: y = rope(x); backward = 1: y = rope^T(x) (x the output's gradient). */
static void row(const void *x, int xk, const float *c, const float *s, void *y, int yk, int64_t d, int backward) {
    const int64_t h = d / 2;
    float in[512], out[512];
    for (int64_t i = 0; i < d; i++) in[i] = widen(x, i, xk);
    if (!backward) {
        for (int64_t i = 0; i < h; i++) {
            out[i] = in[i] * c[i] + (-in[i + h]) * s[i];
            out[i + h] = in[i + h] * c[i + h] + in[i] * s[i + h];
        }
    } else {
        for (int64_t i = 0; i < h; i++) {
            out[i] = in[i] * c[i] + in[i + h] * s[i + h];
            out[i + h] = in[i + h] * c[i + h] + (-(in[i] * s[i]));
        }
    }
    for (int64_t i = 0; i < d; i++) store(y, i, out[i], yk);
}

/* x, y: [B, H, S, D] with element strides xs[3], ys[3] over (B, H, S); cos/sin [B or 1, S, D]
 * contiguous (cb: rows of D between batch rows of the tables, S; 0: one table for the batch). 0, or -1 for a D it does not take. */
int minicpm_rotary(const void *x, int xk, const int64_t *xs, const float *cos, const float *sin, int64_t cb,
                   void *y, int yk, const int64_t *ys, int64_t B, int64_t H, int64_t S, int64_t D, int backward,
                   int threads) {
    if (D % 2 || D > 512) return -1;
    const int64_t rows = B * H * S;
    const size_t xe = xk == K_F32 ? 4 : 2, ye = yk == K_F32 ? 4 : 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t b = r / (H * S), hh = r / S % H, t = r % S;
        const float *cr = cos + (b * cb + t) * D, *sr = sin + (b * cb + t) * D;
        row((const char *)x + (b * xs[0] + hh * xs[1] + t * xs[2]) * xe, xk, cr, sr,
            (char *)y + (b * ys[0] + hh * ys[1] + t * ys[2]) * ye, yk, D, backward);
    }
    return 0;
}
