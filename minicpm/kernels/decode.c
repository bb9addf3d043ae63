// The decode step of every decoder layer in one call: B rows of hidden state, one new token each.
//
// In Python a layer is dozens of small tensor ops (norms, rotary, cache writes, casts, views),
// ~0.3 ms per layer per token, most of a small model's step. Here the glue between the matrix
// products runs on the calling thread in plain loops, and the products themselves are the
// existing kernels, called through function pointers that Python took from their libraries
// (qgemm_plan, minicpm_linear_bf16/f32, minicpm_decode_attention): each opens its own OpenMP
// region, as it does when PyTorch calls it.
//
// Rounding follows minicpm/model.py step by step: wherever the Python path casts to the model
// dtype (fp32 or bf16), the value is rounded here (bf16: to nearest even); statistics, rotary
// and softmax run in fp32. This file is compiled with -ffp-contract=off, so `a*b + c*d` rounds
// twice as PyTorch's separate ops do. What can still differ from the Python path is the
// summation order of the RMSNorm mean and the libm exp of SiLU/softmax (a few ulp in fp32).
//
// Layouts: x [B, D]; cos/sin fp32 [B, head_dim]; the KV stores [slots, KV, max_len, head_dim]
// in the model dtype, or int8 with fp32 scales [slots, KV, max_len] (one per (token, head)).

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int minicpm_decode_abi(void) { return 1; }

enum { DT_F32 = 0, DT_BF16 = 1 };                  // model dtype: qgemm's and attention's codes
enum { P_QGEMM = 0, P_STREAM = 1 };                // projection kernels
enum { ACT_SILU = 0, ACT_THRESHOLD = 1 };          // SwiGLU, or FATReLU/ReLU (z > threshold)
enum { ATT_I8 = 3 };                               // attention.c's kind for an int8 cache

typedef int (*qgemm_fn)(const void *plan, const void *x, int xkind, long m, void *y, int threads);
typedef void (*stream_fn)(const void *x, int64_t m, int64_t k, const void *w, int64_t n, const void *bias,
                          void *y, int threads);
typedef int (*attention_fn)(const float *q, const void *k, const void *v, const float *kscale,
                            const float *vscale, const uint8_t *mask, const int64_t *rows,
                            const int64_t *starts, const int64_t *ends, float *out, int64_t batch,
                            int64_t slots, int64_t heads, int64_t kv_heads, int64_t max_len, int64_t len,
                            int64_t d, int kind, float softmax_scale, int threads);

struct proj {            // one projection y [M, n] = x [M, k] W^T (+ bias)
    void *fn;            // qgemm_plan or minicpm_linear_{bf16,f32}
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
    float *kscale, *vscale;         // int8 cache only
};

struct step {
    int64_t batch, hidden, heads, kv_heads, head_dim, inter, slots, max_len, len;
    int64_t dtype, kv_int8, act, threads;
    float eps, residual_scale, threshold, softmax_scale;
    const float *cos, *sin;                         // [B, head_dim]
    const int64_t *rows, *positions;                // where row b writes its k/v
    const int64_t *starts, *ends;                   // what it attends (NULL: 0, len)
    const uint8_t *mask;                            // [B, len] or NULL (0 = padding)
    void *attention;                                // minicpm_decode_attention
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

static int project(const struct proj *p, const void *x, int64_t m, void *y, const struct step *s) {
    if (p->kind == P_QGEMM) return ((qgemm_fn)p->fn)(p->plan, x, (int)s->dtype, (long)m, y, (int)s->threads);
    ((stream_fn)p->fn)(x, m, p->k, p->w, p->n, p->bias, y, (int)s->threads);
    return 0;
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

// k/v of row b ([KV, head_dim]) into cache row rows[b] at positions[b]
static void write_cache(const struct layer *L, const struct step *s, const void *k, const void *v, int64_t b) {
    const int dt = (int)s->dtype;
    const int64_t d = s->head_dim;
    for (int64_t h = 0; h < s->kv_heads; h++) {
        const int64_t slot = (s->rows[b] * s->kv_heads + h) * s->max_len + s->positions[b];
        const void *kh = at((void *)k, (b * s->kv_heads + h) * d, dt), *vh = at((void *)v, (b * s->kv_heads + h) * d, dt);
        if (s->kv_int8) {
            quantize_head(kh, d, dt, (int8_t *)L->kstore + slot * d, L->kscale + slot);
            quantize_head(vh, d, dt, (int8_t *)L->vstore + slot * d, L->vscale + slot);
        } else {
            memcpy(at(L->kstore, slot * d, dt), kh, (size_t)d * (dt == DT_BF16 ? 2 : 4));
            memcpy(at(L->vstore, slot * d, dt), vh, (size_t)d * (dt == DT_BF16 ? 2 : 4));
        }
    }
}

// x += branch * residual_scale, each step rounded to the dtype
static void residual(void *x, const void *branch, int64_t n, float scale, int dt) {
    for (int64_t i = 0; i < n; i++) put(x, i, get(x, i, dt) + rnd(get(branch, i, dt) * scale, dt), dt);
}

// g = act(g) * u in the dtype (SiLU, or FATReLU: z where z > threshold, else 0)
static void gated(void *g, const void *u, int64_t n, const struct step *s) {
    const int dt = (int)s->dtype;
    for (int64_t i = 0; i < n; i++) {
        const float z = get(g, i, dt);
        const float a = s->act == ACT_SILU ? rnd(z / (1.0f + expf(-z)), dt) : (z > s->threshold ? z : 0.0f);
        put(g, i, a * get(u, i, dt), dt);
    }
}

struct scratch {  // model-dtype buffers (fp32-sized) for one call
    void *h, *q, *k, *v, *ao, *o, *g, *u, *e;
    float *qf, *att, *probs;
};

static int attention_block(const struct layer *L, const struct step *s, void *x, struct scratch *t) {
    const int dt = (int)s->dtype;
    const int64_t B = s->batch, D = s->hidden, d = s->head_dim, H = s->heads, KV = s->kv_heads;
    for (int64_t b = 0; b < B; b++) rmsnorm(at(x, b * D, dt), L->norm1, at(t->h, b * D, dt), D, s->eps, dt);
    if (project(&L->q, t->h, B, t->q, s) || project(&L->k, t->h, B, t->k, s) || project(&L->v, t->h, B, t->v, s))
        return -2;
    for (int64_t b = 0; b < B; b++) {
        rotate(at(t->q, b * H * d, dt), H, d, s->cos + b * d, s->sin + b * d, dt);
        rotate(at(t->k, b * KV * d, dt), KV, d, s->cos + b * d, s->sin + b * d, dt);
        write_cache(L, s, t->k, t->v, b);
    }
    for (int64_t i = 0; i < B * H * d; i++) t->qf[i] = get(t->q, i, dt);
    const int kind = s->kv_int8 ? ATT_I8 : dt;
    if (((attention_fn)s->attention)(t->qf, L->kstore, L->vstore, L->kscale, L->vscale, s->mask, s->rows, s->starts,
                                     s->ends, t->att, B, s->slots, H, KV, s->max_len, s->len, d, kind,
                                     s->softmax_scale, (int)s->threads))
        return -1;
    for (int64_t i = 0; i < B * H * d; i++) put(t->ao, i, t->att[i], dt);
    if (project(&L->o, t->ao, B, t->o, s)) return -2;
    residual(x, t->o, B * D, s->residual_scale, dt);
    return 0;
}

// MoE.forward for one row h [D] into out [D]: softmax over the experts in fp32, top-k,
// renormalised weights cast to the dtype, experts added in ascending order (index_add_)
static int moe_row(const struct layer *L, const struct step *s, const void *h, void *out, struct scratch *t) {
    const int dt = (int)s->dtype;
    const int64_t E = L->router.n, D = s->hidden, F = s->inter;
    if (project(&L->router, h, 1, t->e, s)) return -2;
    float mx = -INFINITY, sum = 0;
    for (int64_t e = 0; e < E; e++) mx = fmaxf(mx, get(t->e, e, dt));
    for (int64_t e = 0; e < E; e++) sum += (t->probs[e] = expf(get(t->e, e, dt) - mx));
    for (int64_t e = 0; e < E; e++) t->probs[e] /= sum;
    int64_t chosen[64];
    float weight[64], total = 0;
    for (int64_t j = 0; j < L->top_k; j++) {  // top-k, largest first, the lower index on ties
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            int taken = 0;
            for (int64_t i = 0; i < j; i++) taken |= chosen[i] == e;
            if (!taken && (best < 0 || t->probs[e] > t->probs[best])) best = e;
        }
        chosen[j] = best;
        weight[j] = t->probs[best];
        total += weight[j];
    }
    for (int64_t i = 0; i < D; i++) put(out, i, 0.0f, dt);
    for (int64_t e = 0; e < E; e++)
        for (int64_t j = 0; j < L->top_k; j++) {
            if (chosen[j] != e) continue;
            const struct proj *w = L->experts + 3 * e;
            if (project(&w[0], h, 1, t->g, s) || project(&w[1], h, 1, t->u, s)) return -2;
            gated(t->g, t->u, F, s);
            if (project(&w[2], t->g, 1, t->o, s)) return -2;
            const float scale = rnd(weight[j] / total, dt);
            for (int64_t i = 0; i < D; i++) put(out, i, get(out, i, dt) + rnd(get(t->o, i, dt) * scale, dt), dt);
        }
    return 0;
}

static int mlp_block(const struct layer *L, const struct step *s, void *x, struct scratch *t) {
    const int dt = (int)s->dtype;
    const int64_t B = s->batch, D = s->hidden;
    for (int64_t b = 0; b < B; b++) rmsnorm(at(x, b * D, dt), L->norm2, at(t->h, b * D, dt), D, s->eps, dt);
    if (L->experts) {
        for (int64_t b = 0; b < B; b++)
            if (moe_row(L, s, at(t->h, b * D, dt), at(t->ao, b * D, dt), t)) return -2;
        residual(x, t->ao, B * D, s->residual_scale, dt);
        return 0;
    }
    if (project(&L->gate, t->h, B, t->g, s) || project(&L->up, t->h, B, t->u, s)) return -2;
    gated(t->g, t->u, B * s->inter, s);
    if (project(&L->down, t->g, B, t->o, s)) return -2;
    residual(x, t->o, B * D, s->residual_scale, dt);
    return 0;
}

// Runs every layer on x [B, D] in place. 0; -1: attention refused a shape; -2: out of memory.
int minicpm_decode_layers(const struct step *s, const struct layer *layers, int64_t nlayers, void *x) {
    if (s->head_dim > 512) return -1;
    const int64_t B = s->batch, HD = s->heads * s->head_dim;
    const int64_t wide = HD > s->hidden ? HD : s->hidden;
    struct scratch t;
    void **bufs[] = {&t.h, &t.q, &t.k, &t.v, &t.ao, &t.o, &t.g, &t.u, &t.e};
    const int64_t sizes[] = {B * s->hidden, B * HD, B * HD, B * HD, B * wide, B * s->hidden,
                             B * s->inter, B * s->inter, 64 + (layers[0].experts ? layers[0].router.n : 0)};
    int failed = 0;
    for (int i = 0; i < 9; i++) failed |= !(*bufs[i] = malloc((size_t)sizes[i] * 4));
    t.qf = malloc((size_t)B * HD * 4);
    t.att = malloc((size_t)B * HD * 4);
    t.probs = malloc((size_t)sizes[8] * 4);
    failed |= !t.qf || !t.att || !t.probs;
    int rc = failed ? -2 : 0;
    for (int64_t l = 0; l < nlayers && !rc; l++) {
        rc = attention_block(&layers[l], s, x, &t);
        if (!rc) rc = mlp_block(&layers[l], s, x, &t);
    }
    for (int i = 0; i < 9; i++) free(*bufs[i]);
    free(t.qf);
    free(t.att);
    free(t.probs);
    return rc;
}
