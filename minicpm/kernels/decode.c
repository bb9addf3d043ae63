// The decode step of every decoder layer in one call: B rows of hidden state, one new token each.
//
// In Python a layer is dozens of small tensor ops (norms, rotary, cache writes, casts, views),
// ~0.3 ms per layer per token, most of a small model's step. Here the whole step is ONE OpenMP
// parallel region: the matrix products and attention are the existing kernels' "team" entry
// points (qgemm_plan_team, minicpm_linear_{bf16,f32}_team, minicpm_decode_attention_team, called
// through function pointers that Python took from their libraries), each doing its thread's
// share with no region or allocation of its own; barriers separate the stages. A region per
// product (8 a layer) cost ~240 fork/joins a token, more than the glue itself. The glue is split
// across threads by row (norms, residuals), by head (rotary and cache writes) or by value (SwiGLU).
// Rows of one sequence's prompt chunk attend together (minicpm_chunk_attention_team) where the
// caller passes that kernel, else each row attends alone.
//
// Rounding follows minicpm/model.py step by step: wherever the Python path casts to the model
// dtype (fp32 or bf16), the value is rounded here (bf16: to nearest even); statistics, rotary
// and softmax run in fp32. This file is compiled with -ffp-contract=off, so `a*b + c*d` rounds
// twice as PyTorch's separate ops do. What can still differ from the Python path is the
// summation order of the RMSNorm mean and the exp of SiLU/softmax (a few ulp in fp32).
//
// Layouts: x [B, D]; cos/sin fp32 [B, head_dim]; the KV stores [slots, KV, max_len, head_dim]
// in the model dtype (or bf16/fp16 under fp32 activations: kv_bits 16), or int8 with fp32 scales [slots, KV, max_len] (one per (token, head)), or
// int4 codes [slots, KV, max_len, head_dim / 2]: values with fp32 (scale, min) [slots, KV, max_len, 2],
// keys with per-channel (scales, mins) [slots, KV, max_len / KEY_BLOCK, 2, head_dim] and each row's
// newest block of keys in fp32 [slots, KV, KEY_BLOCK, head_dim] (Int4KVCache).

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int minicpm_decode_abi(void) { return 9; }

enum { DT_F32 = 0, DT_BF16 = 1 };                  // model dtype: qgemm's and attention's codes
enum { P_QGEMM = 0, P_STREAM = 1 };                // projection kernels
enum { ACT_SILU = 0, ACT_THRESHOLD = 1 };          // SwiGLU, or FATReLU/ReLU (z > threshold)
enum { ATT_F16 = 2, ATT_I8 = 3, ATT_I4 = 4 };      // attention.c's kinds for fp16 / int8 / int4 caches
enum { KEY_BLOCK = 32 };                           // attention.c's: int4 keys' positions per block

typedef int (*qgemm_fn)(const void *plan, const void *x, int xkind, long m, void *y, int tid, int nt, void *scratch,
                        const void *held, void *shared);
typedef long (*qscratch_fn)(const void *plan, long m);
typedef void (*stream_fn)(const void *x, int64_t m, int64_t k, const void *w, int64_t n, const void *bias,
                          void *y, int tid, int nt);
typedef int (*attention_fn)(const float *q, const void *k, const void *v, const float *kscale,
                            const float *vscale, const uint8_t *mask, const int64_t *rows,
                            const int64_t *starts, const int64_t *ends, float *out, int64_t batch,
                            int64_t slots, int64_t heads, int64_t kv_heads, int64_t max_len, int64_t len,
                            int64_t d, int kind, float softmax_scale, int tid, int nt, float *scores);
typedef int (*chunk_attention_fn)(const float *q, const void *k, const void *v, const float *kscale,
                                  const float *vscale, int64_t row, int64_t slots, int64_t heads, int64_t kv_heads,
                                  int64_t max_len, int64_t past, int64_t S, int64_t d, int kind, float scale,
                                  float *out, int tid, int nt, float *work);
typedef int64_t (*chunk_floats_fn)(int64_t len, int64_t d);

struct proj {            // one projection y [M, n] = x [M, k] W^T (+ bias)
    void *fn;            // qgemm_plan_team or minicpm_linear_{bf16,f32}_team
    const void *plan;    // qgemm: its struct qplan
    const void *w, *bias;  // stream: the weight [n, k] and bias [n] in the model dtype
    int64_t n, k, kind;
};

struct layer {
    const void *norm1, *norm2;      // RMSNorm weights in the model dtype
    struct proj q, k, v, o;
    struct proj gate, up, down;     // the MLP (no experts)
    struct proj router;             // MoE: n = number of experts
    const struct proj *experts;     // [experts][3]: w1 (gate), w3 (up), w2 (down); NULL: MLP
    int64_t top_k;
    void *kstore, *vstore;
    float *kscale, *vscale;         // int8 / int4 caches only
    float *ktail;                   // int4 caches: fp32 keys of each row's newest block [slots, KV, KEY_BLOCK, D]
    const void *down_rows;          // FATReLU with streamed up: down's weight as [inter, D] rows; else NULL
    int64_t all_neurons;            // with down_rows: every neuron, not only the active ones (model.sparse_mlp False)
};

struct step {
    int64_t batch, hidden, heads, kv_heads, head_dim, inter, slots, max_len, len;
    int64_t dtype, kv_bits, act, threads;           // kv_bits: 0 (the model dtype), 16 (bf16/fp16), 8 or 4
    float eps, residual_scale, threshold, softmax_scale;
    const float *cos, *sin;                         // [B, head_dim]
    const int64_t *rows, *positions;                // where row b writes its k/v
    const int64_t *starts, *ends;                   // what it attends (NULL: 0, len)
    const uint8_t *mask;                            // [B, len] or NULL (0 = padding)
    void *attention;                                // minicpm_decode_attention_team
    void *qscratch;                                 // qgemm_plan_scratch
    void *chunk_attention, *chunk_floats;           // minicpm_chunk_attention_team and its work size, or
                                                    // NULL: a prompt chunk attends row by row as above
    int64_t kv_fp16;                                // kv_bits 16: 1 for IEEE fp16 (llama.cpp's cache), else bf16
};

// f rounded to bf16 (nearest even, as PyTorch's cast), still as an fp32: the low 16 bits are 0
static inline float round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u = f != f ? u | 0x00400000u : u + 0x7fffu + ((u >> 16) & 1u);  // a NaN stays a (quiet) NaN
    u &= 0xffff0000u;
    memcpy(&f, &u, 4);
    return f;
}

static inline float widen_bf16(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t bf16_bits(float f) {  // of an already rounded f
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

// element i of a model-dtype array, as fp32
static inline float get(const void *p, int64_t i, int dt) {
    return dt == DT_BF16 ? widen_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

// f rounded to the model dtype (a cast in the Python path)
static inline float rnd(float f, int dt) { return dt == DT_BF16 ? round_bf16(f) : f; }

static inline void put(void *p, int64_t i, float f, int dt) {
    if (dt == DT_BF16)
        ((uint16_t *)p)[i] = bf16_bits(round_bf16(f));
    else
        ((float *)p)[i] = f;
}

static inline void *at(void *p, int64_t i, int dt) { return (char *)p + i * (dt == DT_BF16 ? 2 : 4); }

struct team {             // one thread of the region: its id, the team's size, its own scratch
    int tid, nt;
    void *qx;             // qgemm_plan_team's quantized x
    void *qshared;        // the team's quantized x for prompt chunks (thread 0's qx, the same on every thread)
    float *scores, *probs;  // attention scores; MoE router probabilities
};

// y = x W^T. `after`: the projection this thread ran just before on the same x and rows (k after q,
// up after gate), whose quantized x qgemm may use again; NULL where x is new.
static int project_after(const struct proj *p, const struct proj *after, const void *x, int64_t m, void *y,
                         const struct step *s, const struct team *tm) {
    if (p->kind == P_QGEMM) {
        const void *held = after && after->kind == P_QGEMM ? after->plan : NULL;
        return ((qgemm_fn)p->fn)(p->plan, x, (int)s->dtype, (long)m, y, tm->tid, tm->nt, tm->qx, held, tm->qshared);
    }
    ((stream_fn)p->fn)(x, m, p->k, p->w, p->n, p->bias, y, tm->tid, tm->nt);
    return 0;
}

static int project(const struct proj *p, const void *x, int64_t m, void *y, const struct step *s,
                   const struct team *tm) {
    return project_after(p, NULL, x, m, y, s, tm);
}

// this thread's share [lo, hi) of n items
static void share(int64_t n, const struct team *tm, int64_t *lo, int64_t *hi) {
    *lo = n * tm->tid / tm->nt;
    *hi = n * (tm->tid + 1) / tm->nt;
}

// RMSNorm.forward: fp32 x * rsqrt(mean(x^2) + eps), cast to the dtype, times the weight
static void rmsnorm(const void *x, const void *w, void *out, int64_t d, float eps, int dt) {
    double sum = 0;
    for (int64_t i = 0; i < d; i++) {
        float v = get(x, i, dt);
        sum += (double)(v * v);
    }
    const float r = 1.0f / sqrtf((float)sum / (float)d + eps);
    for (int64_t i = 0; i < d; i++) put(out, i, rnd(get(x, i, dt) * r, dt) * get(w, i, dt), dt);
}

// apply_rotary on `heads` vectors of head_dim d ("rotate-half"), fp32, cast back
static void rotate(void *v, int64_t heads, int64_t d, const float *cos, const float *sin, int dt) {
    const int64_t half = d / 2;
    float x[512];
    for (int64_t h = 0; h < heads; h++) {
        for (int64_t i = 0; i < d; i++) x[i] = get(v, h * d + i, dt);
        for (int64_t i = 0; i < half; i++) put(v, h * d + i, x[i] * cos[i] - x[i + half] * sin[i], dt);
        for (int64_t i = half; i < d; i++) put(v, h * d + i, x[i] * cos[i] + x[i - half] * sin[i], dt);
    }
}

// Int8KVCache._quantize of one head vector: symmetric absmax, scale clamped at 1e-8, rint
static void quantize_head(const void *src, int64_t d, int dt, int8_t *codes, float *scale) {
    float amax = 0;
    for (int64_t i = 0; i < d; i++) amax = fmaxf(amax, fabsf(get(src, i, dt)));
    float s = amax / 127.0f;
    s = s < 1e-8f ? 1e-8f : s;
    for (int64_t i = 0; i < d; i++) codes[i] = (int8_t)rintf(get(src, i, dt) / s);
    *scale = s;
}

// Int4KVCache._quantize of one value vector: codes round((x - min) / scale) in 0..15 with
// scale = (max - min) / 15 clamped at 1e-8; 16 values in 8 bytes (value j low, j + 8 high)
static void quantize_head4(const void *src, int64_t d, int dt, uint8_t *codes, float *meta) {
    float lo = INFINITY, hi = -INFINITY;
    for (int64_t i = 0; i < d; i++) {
        const float x = get(src, i, dt);
        lo = fminf(lo, x);
        hi = fmaxf(hi, x);
    }
    float s = (hi - lo) / 15.0f;
    s = s < 1e-8f ? 1e-8f : s;
    for (int64_t c = 0; c < d; c += 16)
        for (int64_t j = 0; j < 8; j++) {
            const float a = rintf((get(src, c + j, dt) - lo) / s), b = rintf((get(src, c + j + 8, dt) - lo) / s);
            const int qa = a < 0 ? 0 : a > 15 ? 15 : (int)a, qb = b < 0 ? 0 : b > 15 ? 15 : (int)b;
            codes[c / 2 + j] = (uint8_t)(qa | qb << 4);
        }
    meta[0] = s;
    meta[1] = lo;
}

// Int4KVCache's key write of one head vector at `pos` of cache row `row`: the vector joins the
// fp32 copy of its block so far (the tail), and the block's per-channel scale = (max - min) / 15
// (clamped at 1e-8) and min are taken again over the tail, and all its codes so far rewritten.
static void store_key4(const struct layer *L, const struct step *s, const void *src, int64_t row, int64_t h,
                       int64_t pos) {
    const int dt = (int)s->dtype;
    const int64_t d = s->head_dim, head = row * s->kv_heads + h, block = pos / KEY_BLOCK, n = pos % KEY_BLOCK + 1;
    float *tail = L->ktail + head * KEY_BLOCK * d, *scale = L->kscale + (head * (s->max_len / KEY_BLOCK) + block) * 2 * d;
    float *min = scale + d, hi[d];
    for (int64_t i = 0; i < d; i++) tail[(n - 1) * d + i] = get(src, i, dt);
    // loops over the channels innermost: they vectorize (a block is up to 32 x head_dim values)
    for (int64_t i = 0; i < d; i++) min[i] = hi[i] = tail[i];
    for (int64_t j = 1; j < n; j++)
        for (int64_t i = 0; i < d; i++) {
            const float x = tail[j * d + i];
            min[i] = x < min[i] ? x : min[i];
            hi[i] = x > hi[i] ? x : hi[i];
        }
    for (int64_t i = 0; i < d; i++) {
        const float step = (hi[i] - min[i]) / 15.0f;
        scale[i] = step < 1e-8f ? 1e-8f : step;
    }
    uint8_t q[d], *codes = (uint8_t *)L->kstore + (head * s->max_len + block * KEY_BLOCK) * d / 2;
    for (int64_t j = 0; j < n; j++) {
        for (int64_t i = 0; i < d; i++) {
            const float a = rintf((tail[j * d + i] - min[i]) / scale[i]);
            q[i] = a < 0 ? 0 : a > 15 ? 15 : (uint8_t)a;
        }
        for (int64_t c = 0; c < d; c += 16)
            for (int64_t i = 0; i < 8; i++) codes[(j * d + c) / 2 + i] = (uint8_t)(q[c + i] | q[c + i + 8] << 4);
    }
}

// k/v head h of row b ([KV, head_dim]) into cache row rows[b] at positions[b]
static void write_cache(const struct layer *L, const struct step *s, const void *k, const void *v, int64_t b,
                        int64_t h) {
    const int dt = (int)s->dtype;
    const int64_t d = s->head_dim;
    const int64_t slot = (s->rows[b] * s->kv_heads + h) * s->max_len + s->positions[b];
    const void *kh = at((void *)k, (b * s->kv_heads + h) * d, dt), *vh = at((void *)v, (b * s->kv_heads + h) * d, dt);
    if (s->kv_bits == 8) {
        quantize_head(kh, d, dt, (int8_t *)L->kstore + slot * d, L->kscale + slot);
        quantize_head(vh, d, dt, (int8_t *)L->vstore + slot * d, L->vscale + slot);
    } else if (s->kv_bits == 4) {
        store_key4(L, s, kh, s->rows[b], h, s->positions[b]);
        quantize_head4(vh, d, dt, (uint8_t *)L->vstore + slot * d / 2, L->vscale + 2 * slot);
    } else if (s->kv_bits == 16 && dt == DT_F32 && s->kv_fp16) {  // an fp16 cache under fp32 activations
        for (int64_t i = 0; i < d; i++) {  // round to nearest even, as a cast
            ((uint16_t *)L->kstore)[slot * d + i] = _cvtss_sh(get(kh, i, dt), _MM_FROUND_TO_NEAREST_INT);
            ((uint16_t *)L->vstore)[slot * d + i] = _cvtss_sh(get(vh, i, dt), _MM_FROUND_TO_NEAREST_INT);
        }
    } else if (s->kv_bits == 16 && dt == DT_F32) {  // a bf16 cache under fp32 activations
        for (int64_t i = 0; i < d; i++) {
            put(L->kstore, slot * d + i, get(kh, i, dt), DT_BF16);
            put(L->vstore, slot * d + i, get(vh, i, dt), DT_BF16);
        }
    } else {
        memcpy(at(L->kstore, slot * d, dt), kh, (size_t)d * (dt == DT_BF16 ? 2 : 4));
        memcpy(at(L->vstore, slot * d, dt), vh, (size_t)d * (dt == DT_BF16 ? 2 : 4));
    }
}

// x += branch * residual_scale, each step rounded to the dtype
static void residual(void *x, const void *branch, int64_t n, float scale, int dt) {
    for (int64_t i = 0; i < n; i++) put(x, i, get(x, i, dt) + rnd(get(branch, i, dt) * scale, dt), dt);
}

#ifdef __AVX512F__
// e^x, x clamped to [-87, 88]: 2^n e^f with n = round(x / ln 2) and |f| <= ln(2) / 2 (ln 2 in two
// parts), e^f by its Taylor polynomial to degree 7 (truncation below 1e-8 relative)
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), f);
    const float c[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    __m512 p = _mm512_set1_ps(c[0]);
    for (int i = 1; i < 8; i++) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
    return _mm512_scalef_ps(p, n);
}

// SwiGLU in fp32, 16 values at a time (a masked tail, so that every value takes the same
// arithmetic whatever the threads' shares): libm's expf one value at a time was 7% of a prefill
static void silu_gated_f32(float *g, const float *u, int64_t lo, int64_t hi) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = lo; i < hi; i += 16) {
        const __mmask16 k = hi - i >= 16 ? 0xFFFF : (__mmask16)((1u << (hi - i)) - 1);
        const __m512 z = _mm512_maskz_loadu_ps(k, g + i);
        const __m512 a = _mm512_div_ps(z, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), z))));
        _mm512_mask_storeu_ps(g + i, k, _mm512_mul_ps(a, _mm512_maskz_loadu_ps(k, u + i)));
    }
}
#endif

// g = act(g) * u in the dtype (SiLU, or FATReLU: z where z > threshold, else 0), this thread's share
static void gated(void *g, const void *u, int64_t n, const struct step *s, const struct team *tm) {
    const int dt = (int)s->dtype;
    int64_t lo, hi;
    share(n, tm, &lo, &hi);
#ifdef __AVX512F__
    if (dt == DT_F32 && s->act == ACT_SILU) {
        silu_gated_f32(g, u, lo, hi);
        return;
    }
#endif
    for (int64_t i = lo; i < hi; i++) {
        const float z = get(g, i, dt);
        const float a = s->act == ACT_SILU ? rnd(z / (1.0f + expf(-z)), dt) : (z > s->threshold ? z : 0.0f);
        put(g, i, a * get(u, i, dt), dt);
    }
}

struct scratch {  // the team's shared buffers for one call, model dtype (fp32-sized)
    void *h, *q, *k, *v, *ao, *o, *g, *u, *e, *xg;  // e: router logits [B, E]; xg: MoE's gathered rows
    float *qf, *att;
    int32_t *active, *count;  // sparse MLP: each row's active neurons [B, inter] and their number [B]
    int64_t chunk_past;       // rows that are one sequence's positions chunk_past.. (chunk_attention), or -1
};

// Rotary on this thread's share of the heads: a query head (one unit per row and head) is also
// widened to fp32 for attention; a key head (one unit per kv head, every row in order) is written
// to the cache with its value head. Rows of one sequence (a prefill chunk) must be written in
// position order by one thread: an int4 cache's key write rewrites its block from the rows before.
static void rotate_and_store(const struct layer *L, const struct step *s, struct scratch *t, const struct team *tm) {
    const int dt = (int)s->dtype;
    const int64_t d = s->head_dim, H = s->heads, KV = s->kv_heads;
    int64_t lo, hi;
    share(s->batch * H + KV, tm, &lo, &hi);
    for (int64_t u = lo; u < hi; u++) {
        if (u < s->batch * H) {
            const int64_t b = u / H, i = u * d;
            rotate(at(t->q, i, dt), 1, d, s->cos + b * d, s->sin + b * d, dt);
            for (int64_t j = i; j < i + d; j++) t->qf[j] = get(t->q, j, dt);
            continue;
        }
        const int64_t h = u - s->batch * H;
        for (int64_t b = 0; b < s->batch; b++) {
            rotate(at(t->k, (b * KV + h) * d, dt), 1, d, s->cos + b * d, s->sin + b * d, dt);
            write_cache(L, s, t->k, t->v, b, h);
        }
    }
}

// Each thread its share of the rows: x += residual-scaled branch (if any), then h = RMSNorm(x) with
// `norm`; everyone waits. (Thread 0 alone did all of a prefill chunk's 128 rows: 2% of the time.)
static void residual_norm(const struct step *s, void *x, const void *branch, const void *norm, struct scratch *t,
                          const struct team *tm) {
    const int dt = (int)s->dtype;
    const int64_t D = s->hidden;
    int64_t lo, hi;
    share(s->batch, tm, &lo, &hi);
    for (int64_t b = lo; b < hi; b++) {
        if (branch) residual(at(x, b * D, dt), at((void *)branch, b * D, dt), D, s->residual_scale, dt);
        if (norm) rmsnorm(at(x, b * D, dt), norm, at(t->h, b * D, dt), D, s->eps, dt);
    }
#pragma omp barrier
}

// The attention half of a layer, from h = RMSNorm1(x) to o (its residual is added by the caller).
static int attention_block(const struct layer *L, const struct step *s, struct scratch *t, const struct team *tm) {
    const int dt = (int)s->dtype;
    const int64_t B = s->batch, d = s->head_dim, H = s->heads, KV = s->kv_heads;
    if (project(&L->q, t->h, B, t->q, s, tm) || project_after(&L->k, &L->q, t->h, B, t->k, s, tm)
        || project_after(&L->v, &L->k, t->h, B, t->v, s, tm))
        return -2;
#pragma omp barrier
    rotate_and_store(L, s, t, tm);
#pragma omp barrier
    const int kind = s->kv_bits == 8 ? ATT_I8 : s->kv_bits == 4 ? ATT_I4
                     : s->kv_bits == 16 ? (s->kv_fp16 ? ATT_F16 : DT_BF16) : dt;
    if (t->chunk_past >= 0) {
        if (((chunk_attention_fn)s->chunk_attention)(t->qf, L->kstore, L->vstore, L->kscale, L->vscale, s->rows[0],
                                                      s->slots, H, KV, s->max_len, t->chunk_past, B, d, kind,
                                                      s->softmax_scale, t->att, tm->tid, tm->nt, tm->scores))
            return -1;
    } else if (((attention_fn)s->attention)(t->qf, L->kstore, L->vstore, L->kscale, L->vscale, s->mask, s->rows,
                                            s->starts, s->ends, t->att, B, s->slots, H, KV, s->max_len, s->len, d,
                                            kind, s->softmax_scale, tm->tid, tm->nt, tm->scores))
        return -1;
    const void *ao = t->att;  // fp32: the output as it is; bf16: rounded first, as the Python cast
#pragma omp barrier
    if (dt == DT_BF16) {
        int64_t lo, hi;
        share(B * H * d, tm, &lo, &hi);
        for (int64_t i = lo; i < hi; i++) put(t->ao, i, t->att[i], dt);
        ao = t->ao;
#pragma omp barrier
    }
    if (project(&L->o, ao, B, t->o, s, tm)) return -2;
#pragma omp barrier
    return 0;
}

// The router's choice for one row: softmax over its E logits in fp32, the top k (largest first, the
// lower index on ties), their weights renormalised and cast to the dtype (MoE.forward)
static void route(const void *logits, int64_t E, int64_t k, int dt, float *probs, int32_t *chosen, float *scale) {
    float mx = -INFINITY, sum = 0, total = 0, weight[64];
    for (int64_t e = 0; e < E; e++) mx = fmaxf(mx, get(logits, e, dt));
    for (int64_t e = 0; e < E; e++) sum += (probs[e] = expf(get(logits, e, dt) - mx));
    for (int64_t e = 0; e < E; e++) probs[e] /= sum;
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            int taken = 0;
            for (int64_t i = 0; i < j; i++) taken |= chosen[i] == e;
            if (!taken && (best < 0 || probs[e] > probs[best])) best = e;
        }
        chosen[j] = (int32_t)best;
        weight[j] = probs[best];
        total += weight[j];
    }
    for (int64_t j = 0; j < k; j++) scale[j] = rnd(weight[j] / total, dt);
}

// MoE.forward for the B rows of h into out [B, D]. Every thread routes every row (the same way);
// then each chosen expert runs once, on the rows that chose it gathered into one product, so its
// weights are read once per step however many rows of a serving batch picked it; its outputs are
// added to those rows in ascending expert order (index_add_), each thread its share of the values.
static int moe_block(const struct layer *L, const struct step *s, void *out, struct scratch *t,
                     const struct team *tm) {
    const int dt = (int)s->dtype;
    const int64_t E = L->router.n, D = s->hidden, F = s->inter, B = s->batch, K = L->top_k;
    if (project(&L->router, t->h, B, t->e, s, tm)) return -2;
#pragma omp barrier
    int32_t chosen[B * K], rows[B];
    float scale[B * K], row_scale[B];
    for (int64_t b = 0; b < B; b++) route(at(t->e, b * E, dt), E, K, dt, tm->probs, chosen + b * K, scale + b * K);
    int64_t lo, hi;
    share(D, tm, &lo, &hi);
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = lo; i < hi; i++) put(out, b * D + i, 0.0f, dt);
    for (int64_t e = 0; e < E; e++) {
        int64_t n = 0;
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < K; j++)
                if (chosen[b * K + j] == e) {
                    rows[n] = (int32_t)b;
                    row_scale[n++] = scale[b * K + j];
                }
        if (!n) continue;
        const void *x = t->h;
        if (n < B) {  // gather the rows that chose e (thread 0: a few rows of D values)
            if (tm->tid == 0)
                for (int64_t r = 0; r < n; r++)
                    memcpy(at(t->xg, r * D, dt), at(t->h, rows[r] * D, dt), (size_t)D * (dt == DT_BF16 ? 2 : 4));
            x = t->xg;
#pragma omp barrier
        }
        const struct proj *w = L->experts + 3 * e;
        if (project(&w[0], x, n, t->g, s, tm) || project_after(&w[1], &w[0], x, n, t->u, s, tm)) return -2;
#pragma omp barrier
        gated(t->g, t->u, n * F, s, tm);
#pragma omp barrier
        if (project(&w[2], t->g, n, t->o, s, tm)) return -2;
#pragma omp barrier
        for (int64_t r = 0; r < n; r++)
            for (int64_t i = lo; i < hi; i++) {
                const int64_t at_out = rows[r] * D + i;
                put(out, at_out, get(out, at_out, dt) + rnd(get(t->o, r * D + i, dt) * row_scale[r], dt), dt);
            }
    }
    return 0;
}

// 16 values of a weight row in the dtype from index i, as fp32 (bf16 is the top half of an fp32)
#ifdef __AVX512F__
static inline __m512 load16(const void *w, int64_t i, int dt) {
    if (dt == DT_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i))), 16));
    return _mm512_loadu_ps((const float *)w + i);
}
#endif

// Rows are read GATHER at a time: one row after another leaves the memory idle between them (the
// stream kernels read 16 rows side by side for the same reason). Scattered rows give the hardware
// prefetcher nothing to follow, so the next group's rows are prefetched while a group is summed.
enum { GATHER = 16 };

struct gather {              // a group of weight rows of the dtype, and the group after it
    const void *rows[GATHER], *next[GATHER];
    int n, next_n;
};

static inline void prefetch_next(const struct gather *g, int64_t byte) {
    for (int r = 0; r < g->next_n; r++) _mm_prefetch((const char *)g->next[r] + byte, _MM_HINT_T0);
}

// y[r] = rows[r] . x for the group's rows of length k, x in the dtype; fp32 sums. bf16 with
// AVX512-BF16: the dense stream kernel's arithmetic (vdpbf16ps over 32 values, one reduction), so
// each y[r] is bitwise what linear_bf16.c gives for that row.
static void dot_rows(const struct gather *g, const void *x, int64_t k, int dt, float *y) {
    const void *const *rows = g->rows;
    const int n = g->n, size = dt == DT_BF16 ? 2 : 4;
#if defined(__AVX512BF16__)
    if (dt == DT_BF16) {
        __m512 acc[GATHER];
        for (int r = 0; r < n; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t i = 0; i < k; i += 32) {
            prefetch_next(g, i * 2);
            const __mmask32 lanes = k - i >= 32 ? 0xffffffffu : (__mmask32)((1u << (k - i)) - 1);
            const __m512i xs = _mm512_maskz_loadu_epi16(lanes, (const uint16_t *)x + i);
            for (int r = 0; r < n; r++)
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(lanes, (const uint16_t *)rows[r] + i),
                                          (__m512bh)xs);
        }
        for (int r = 0; r < n; r++) y[r] = _mm512_reduce_add_ps(acc[r]);
        return;
    }
#endif
    int64_t i = 0;
    for (int r = 0; r < n; r++) y[r] = 0;
#ifdef __AVX512F__
    __m512 acc[GATHER];
    for (int r = 0; r < n; r++) acc[r] = _mm512_setzero_ps();
    for (; i + 16 <= k; i += 16) {
        if (i % (64 / size) == 0) prefetch_next(g, i * size);
        const __m512 xs = load16(x, i, dt);
        for (int r = 0; r < n; r++) acc[r] = _mm512_fmadd_ps(load16(rows[r], i, dt), xs, acc[r]);
    }
    for (int r = 0; r < n; r++) y[r] = _mm512_reduce_add_ps(acc[r]);
#endif
    for (; i < k; i++)
        for (int r = 0; r < n; r++) y[r] += get(rows[r], i, dt) * get(x, i, dt);
}

// acc[i - lo] += sum over the group's rows r, in order, of a[r] * rows[r][i] for i in [lo, hi)
static void add_rows(float *acc, const float *a, const struct gather *g, int64_t lo, int64_t hi, int dt) {
    const void *const *rows = g->rows;
    const int n = g->n, size = dt == DT_BF16 ? 2 : 4;
    int64_t i = lo;
#ifdef __AVX512F__
    for (; i + 16 <= hi; i += 16) {
        if ((i - lo) % (64 / size) == 0) prefetch_next(g, i * size);
        __m512 sum = _mm512_loadu_ps(acc + i - lo);
        for (int r = 0; r < n; r++) sum = _mm512_fmadd_ps(_mm512_set1_ps(a[r]), load16(rows[r], i, dt), sum);
        _mm512_storeu_ps(acc + i - lo, sum);
    }
#endif
    for (; i < hi; i++)
        for (int r = 0; r < n; r++) acc[i - lo] += a[r] * get(rows[r], i, dt);
}

// grp: the rows active[p..] (at most `size`, before `end`) of a [*, d] weight and the group after them
static void group_rows(struct gather *grp, const int32_t *active, int64_t p, int64_t end, int size, const void *w,
                       int64_t d, int dt) {
    grp->n = end - p < size ? (int)(end - p > 0 ? end - p : 0) : size;
    grp->next_n = end - p - grp->n < size ? (int)(end - p - grp->n > 0 ? end - p - grp->n : 0) : size;
    for (int r = 0; r < grp->n; r++) grp->rows[r] = at((void *)w, active[p + r] * d, dt);
    for (int r = 0; r < grp->next_n; r++) grp->next[r] = at((void *)w, active[p + grp->n + r] * d, dt);
}

// The indices j of z[j] > threshold, ascending, into out; returns how many (vector compares and
// compressed stores: a branch per neuron mispredicts at ~12% active)
static int32_t list_active(const void *z, int64_t n, float threshold, int dt, int32_t *out) {
    int32_t count = 0;
    int64_t j = 0;
#ifdef __AVX512F__
    const __m512 limit = _mm512_set1_ps(threshold);
    __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; j + 16 <= n; j += 16, index = _mm512_add_epi32(index, _mm512_set1_epi32(16))) {
        const __mmask16 on = _mm512_cmp_ps_mask(load16(z, j, dt), limit, _CMP_GT_OQ);
        _mm512_mask_compressstoreu_epi32(out + count, on, index);
        count += __builtin_popcount(on);
    }
#endif
    for (; j < n; j++)
        if (get(z, j, dt) > threshold) out[count++] = (int32_t)j;
    return count;
}

// FATReLU's MLP, reading only what its active neurons need (MiniCPM-S: ~88% of the gate's outputs
// are zero, so their rows of up and columns of down contribute nothing). The gate's product is the
// dense one; then each row lists its active neurons (gate > threshold), takes up's product for
// those rows of up only, and adds those rows of down's transpose (`down_rows`: the model stores
// down's weight as one contiguous row per neuron) times the gated values. Same values as PyTorch's
// dense products up to fp32 summation order. With all_neurons every row is read: the dense cost.
static const void *sparse_mlp(const struct layer *L, const struct step *s, struct scratch *t, const struct team *tm,
                              int *rc) {
    const int dt = (int)s->dtype;
    const int64_t B = s->batch, D = s->hidden, F = s->inter;
    if (project(&L->gate, t->h, B, t->g, s, tm)) *rc = -2;
#pragma omp barrier
    if (tm->tid == 0)
        for (int64_t b = 0; b < B; b++) t->count[b] = list_active(at(t->g, b * F, dt), F, L->all_neurons ? -INFINITY : s->threshold, dt, t->active + b * F);
#pragma omp barrier
    // up: this thread's share of all rows' active neurons; g becomes act(g) * u there (as gated)
    int64_t total = 0, lo, hi;
    for (int64_t b = 0; b < B; b++) total += t->count[b];
    share(total, tm, &lo, &hi);
    for (int64_t b = 0, first = 0; b < B; first += t->count[b], b++) {
        const int64_t from = lo > first ? lo : first, to = hi < first + t->count[b] ? hi : first + t->count[b];
        const int32_t *active = t->active + b * F - first;  // the row's pairs, indexed by pair
        struct gather grp;
        group_rows(&grp, active, from, to, GATHER, L->up.w, D, dt);
        for (int64_t p = from; p < to; p += GATHER) {
            const int n = grp.n;
            float u[GATHER];
            dot_rows(&grp, at(t->h, b * D, dt), D, dt, u);
            for (int r = 0; r < n; r++) {
                const int64_t j = active[p + r];
                const float z = get(t->g, b * F + j, dt);
                put(t->g, b * F + j, (z > s->threshold ? z : 0.0f) * rnd(u[r], dt), dt);
            }
            group_rows(&grp, active, p + GATHER, to, GATHER, L->up.w, D, dt);
        }
    }
#pragma omp barrier
    // down: this thread's share of the outputs (whole vectors of 16), summed over the active rows
    share((D + 15) / 16, tm, &lo, &hi);
    lo *= 16;
    hi = hi * 16 < D ? hi * 16 : D;
    float acc[hi > lo ? hi - lo : 1];
    for (int64_t b = 0; b < B; b++) {
        for (int64_t i = lo; i < hi; i++) acc[i - lo] = 0;
        const int32_t *active = t->active + b * F;
        struct gather grp;
        group_rows(&grp, active, 0, t->count[b], GATHER / 2, L->down_rows, D, dt);
        for (int64_t p = 0; p < t->count[b]; p += GATHER / 2) {
            float a[GATHER / 2];
            for (int r = 0; r < grp.n; r++) a[r] = get(t->g, b * F + active[p + r], dt);
            add_rows(acc, a, &grp, lo, hi, dt);
            group_rows(&grp, active, p + GATHER / 2, t->count[b], GATHER / 2, L->down_rows, D, dt);
        }
        for (int64_t i = lo; i < hi; i++) put(t->o, b * D + i, acc[i - lo], dt);
    }
#pragma omp barrier
    return t->o;
}

// The MLP half of a layer, from h = RMSNorm2(x) to its branch (returned; the caller adds it).
static const void *mlp_block(const struct layer *L, const struct step *s, struct scratch *t, const struct team *tm,
                             int *rc) {
    const int64_t B = s->batch;
    if (L->experts) {
        *rc = moe_block(L, s, t->ao, t, tm);
#pragma omp barrier
        return t->ao;
    }
    if (L->down_rows) return sparse_mlp(L, s, t, tm, rc);
    if (project(&L->gate, t->h, B, t->g, s, tm) || project_after(&L->up, &L->gate, t->h, B, t->u, s, tm)) *rc = -2;
#pragma omp barrier
    gated(t->g, t->u, B * s->inter, s, tm);
#pragma omp barrier
    if (project(&L->down, t->g, B, t->o, s, tm)) *rc = -2;
#pragma omp barrier
    return t->o;
}

// Every layer, run by each thread of the region (all take the same path: a failure is the same
// on every thread). Returns 0, -1 or -2 as minicpm_decode_layers.
static int team_layers(const struct step *s, const struct layer *layers, int64_t nlayers, void *x, struct scratch *t,
                       const struct team *tm) {
    const void *branch = NULL;  // the last block's output, added to x before the next norm
    int rc = 0;
    for (int64_t l = 0; l < nlayers && !rc; l++) {
        residual_norm(s, x, branch, layers[l].norm1, t, tm);
        if ((rc = attention_block(&layers[l], s, t, tm))) break;
        residual_norm(s, x, t->o, layers[l].norm2, t, tm);
        branch = mlp_block(&layers[l], s, t, tm, &rc);
    }
    if (!rc) residual_norm(s, x, branch, NULL, t, tm);
    return rc;
}

// The first position of rows that are a prompt chunk chunk_attention takes (B > 1 rows of one cache
// row at consecutive positions, each attending to everything up to itself, no mask), else -1.
static int64_t chunk_past(const struct step *s) {
    if (!s->chunk_attention || s->batch < 2 || s->mask || !s->rows || !s->ends) return -1;
    const int64_t B = s->batch, p0 = s->positions[0];
    for (int64_t b = 0; b < B; b++)
        if (s->rows[b] != s->rows[0] || s->positions[b] != p0 + b || (s->starts && s->starts[b])
            || s->ends[b] != p0 + b + 1)
            return -1;
    return p0;
}

// Bytes of each thread's own scratch: the largest quantized x any qgemm projection takes (0 if
// one has a layout it refuses), then attention scores (or a chunk's attention work, `attention`
// floats) and router probabilities.
static int64_t team_bytes(const struct step *s, const struct layer *layers, int64_t nlayers, int64_t attention,
                          int64_t *qbytes) {
    int64_t most = 64;
    for (int64_t l = 0; l < nlayers; l++) {
        const struct layer *L = &layers[l];
        const struct proj *named[] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down, &L->router};
        const int64_t nexp = L->experts ? 3 * L->router.n : 0;
        for (int64_t i = 0; i < 8 + nexp; i++) {
            const struct proj *p = i < 8 ? named[i] : L->experts + (i - 8);
            if (p->kind != P_QGEMM || !p->fn) continue;
            const int64_t need = ((qscratch_fn)s->qscratch)(p->plan, (long)s->batch);
            if (!need) return 0;
            most = need > most ? need : most;
        }
    }
    *qbytes = (most + 63) / 64 * 64;
    const int64_t experts = layers[0].experts ? layers[0].router.n : 0;
    return (*qbytes + 4 * (attention + experts) + 63) / 64 * 64;  // own cache lines
}

// Runs every layer on x [B, D] in place. 0; -1: attention refused a shape; -2: out of memory.
int minicpm_decode_layers(const struct step *s, const struct layer *layers, int64_t nlayers, void *x) {
    if (s->head_dim > 512 || s->heads % s->kv_heads) return -1;
    const int64_t B = s->batch, HD = s->heads * s->head_dim;
    const int64_t wide = HD > s->hidden ? HD : s->hidden;
    const int threads = s->threads < 1 ? 1 : (int)s->threads;
    int64_t qbytes = 0;
    struct scratch t;
    t.chunk_past = chunk_past(s);
    const int64_t scores = (s->heads / s->kv_heads) * s->len;
    const int64_t attention = t.chunk_past < 0 ? scores : ((chunk_floats_fn)s->chunk_floats)(t.chunk_past + B, s->head_dim);
    const int64_t own = team_bytes(s, layers, nlayers, attention, &qbytes);
    void **bufs[] = {&t.h, &t.q, &t.k, &t.v, &t.ao, &t.o, &t.g, &t.u, &t.e, (void **)&t.qf, (void **)&t.att,
                     (void **)&t.active, (void **)&t.count, &t.xg};
    const int64_t sizes[] = {B * s->hidden, B * HD, B * HD, B * HD, B * wide, B * s->hidden, B * s->inter,
                             B * s->inter, 64 + B * (layers[0].experts ? layers[0].router.n : 0), B * HD, B * HD,
                             B * s->inter, B, B * s->hidden};
    int failed = !own;
    for (int i = 0; i < 14; i++) failed |= !(*bufs[i] = malloc((size_t)sizes[i] * 4));
    char *mine = failed ? NULL : aligned_alloc(64, (size_t)(own * threads + 63) / 64 * 64);
    int rc = failed || !mine ? -2 : 0;
    if (!rc) {
#pragma omp parallel num_threads(threads) reduction(min : rc)
        {
            char *base = mine + own * omp_get_thread_num();
            const struct team tm = {omp_get_thread_num(), omp_get_num_threads(), base, mine, (float *)(base + qbytes),
                                    (float *)(base + qbytes) + attention};
            rc = team_layers(s, layers, nlayers, x, &t, &tm);
        }
    }
    for (int i = 0; i < 14; i++) free(*bufs[i]);
    free(mine);
    return rc;
}
