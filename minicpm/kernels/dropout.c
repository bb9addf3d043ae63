/* Dropout as one pass: y[i] = x[i] * (keep(i) ? scale : 0), rounded to y's type, where keep(i)
 * comes from a hash of (seed, i) instead of a generator's stream.
 *
 * Why not PyTorch's: LoRA draws a mask over every adapter's input (7 a layer), and
 * bernoulli_, the mask product, the scale and the cast to bf16 are four passes over memory, the
 * first one slow (on 2 Zen 4 cores ~20 ms for 4096 x 576 values, more than the adapter's
 * products). A mask that is a function of (seed, i) is drawn again in the backward pass for the
 * price of the hash, without keeping it or the generator's state, and whatever the thread count.
 *
 * keep(i): the top 24 bits of h(seed, i) below `threshold` = (1 - p) * 2^24, i.e. with
 * probability 1 - p to 2^-24 (PyTorch's bernoulli_ on fp32 draws 24-bit uniforms too).
 * The products and roundings are those of x * mask * scale in fp32, then .to(dtype): mask 0 or 1
 * is exact, x * 0 keeps x's sign (as PyTorch's product does), one rounding for the scale.
 * Plain C: GCC vectorizes the loop (32-bit multiplies and shifts) for the machine it runs on.
 */
#include <omp.h>
#include <stdint.h>
#include <string.h>

enum { K_F32 = 0, K_BF16 = 1 };

int minicpm_dropout_abi(void) { return 1; }

static inline uint32_t fmix32(uint32_t h) {  /* MurmurHash3's finalizer: every bit moves every other */
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

/* 24 random bits of element i under this seed */
static inline uint32_t bits24(uint64_t seed, int64_t i) {
    const uint32_t lo = (uint32_t)i, hi = (uint32_t)((uint64_t)i >> 32);
    return fmix32(fmix32(lo * 0x9e3779b1u + (uint32_t)seed) ^ (hi + (uint32_t)(seed >> 32))) >> 8;
}

static inline float widen_bf16(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf16(float f) {  /* nearest even, as PyTorch's cast; a NaN stays quiet NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    u = f != f ? u | 0x00400000u : u + 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline __attribute__((always_inline)) void run(const void *x, const int xkind, void *y, const int ykind,
                                                      int64_t i0, int64_t i1, uint64_t seed, uint32_t threshold,
                                                      float scale) {
    for (int64_t i = i0; i < i1; i++) {
        const float v = xkind == K_BF16 ? widen_bf16(((const uint16_t *)x)[i]) : ((const float *)x)[i];
        const float out = v * (bits24(seed, i) < threshold ? scale : 0.0f);
        if (ykind == K_BF16)
            ((uint16_t *)y)[i] = to_bf16(out);
        else
            ((float *)y)[i] = out;
    }
}

/* y[i] = x[i] * (keep(i) ? scale : 0) for i in [0, n): x and y fp32 or bf16 (kinds 0, 1). */
void minicpm_dropout(const void *x, int xkind, void *y, int ykind, int64_t n, uint64_t seed,
                     uint32_t threshold, float scale, int nthreads) {
    const int64_t chunks = (n + 4095) / 4096;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t i0 = c * 4096, i1 = i0 + 4096 < n ? i0 + 4096 : n;
        /* each pair of kinds its own loop, so that each vectorizes */
        if (xkind == K_F32 && ykind == K_F32) run(x, K_F32, y, K_F32, i0, i1, seed, threshold, scale);
        else if (xkind == K_F32) run(x, K_F32, y, K_BF16, i0, i1, seed, threshold, scale);
        else if (ykind == K_F32) run(x, K_BF16, y, K_F32, i0, i1, seed, threshold, scale);
        else run(x, K_BF16, y, K_BF16, i0, i1, seed, threshold, scale);
    }
}
