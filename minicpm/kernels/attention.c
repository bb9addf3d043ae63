// Attention of one new token per sequence against its KV cache (the decode step), on CPU.
//
// PyTorch runs this as two small batched matmuls whose kernels are tuned for big matrices; at
// a 2k context that reads the cache at a few GB/s. Here each key and value row is read once
// per kv head and used by every query head that shares it (GQA), so the step streams the
// cache at close to memory speed.
//
// Layouts (all contiguous):
//   q      float32 [B, H, D]                       (already rotated)
//   k, v   [B, KV, max_len, D] of float32 | bf16 | fp16 | int8, positions 0..len-1 valid,
//          or int4: [B, KV, max_len, D/2] bytes, each 16 values in 8 bytes (byte j: value j in
//          the low nibble, value j + 8 in the high one)
//   kscale, vscale  float32 [B, KV, max_len]       (int8: row value = code * scale)
//   vscale          float32 [B, KV, max_len, 2]    (int4 values: value = code * scale + min)
//   kscale          float32 [B, KV, max_len / KEY_BLOCK, 2, D]
//                                                  (int4 keys: in each block of KEY_BLOCK positions
//                                                  channel i is code * scale[i] + min[i]; max_len
//                                                  a multiple of KEY_BLOCK)
//   mask   uint8 [B, len] or NULL                  (0 = padding, not attended)
//   out    float32 [B, H, D]
// Query head h uses kv head h / (H / KV), as in Llama/MiniCPM. D must be a multiple of 16.
// Scores and the softmax are fp32.
//
// Independent slots (the serving engine): query row b may read cache row rows[b] (of `slots`)
// over its own positions [starts[b], ends[b]) (each array NULL: b, 0, len). A row's positions
// are reduced on their own, in the same order whatever the other rows hold, so its result is
// bitwise what it would be alone. With a mask, a row's leading masked positions (left padding)
// are skipped the same way; masked positions after its first attended one stay in its range.

#include <immintrin.h>
#include "avx512_on_avx2.h"
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_F16 = 2, KIND_I8 = 3, KIND_I4 = 4 };

// int4 keys are scaled per channel over blocks of positions (as KIVI does): a few channels of a
// key are far larger than the rest, and one scale per key vector leaves the others a code or
// two (SmolLM2 at 8k tokens: +10.8% perplexity per vector, +1.6% per channel in blocks of 32)
enum { KEY_BLOCK = 32 };

int minicpm_attention_abi(void) { return 10; }

// fp32 numbers per (position, head) beside the codes: int8's scale; int4 values' scale and min
static inline int meta_of(int kind) { return kind == KIND_I4 ? 2 : 1; }

static inline __m512 load16(const void *base, int kind, size_t i) {
    switch (kind) {
    case KIND_BF16: {  // bf16 is the top half of an fp32
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    case KIND_F16:
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i)));
    case KIND_I8:
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)base + i))));
    case KIND_I4: {  // the codes 0..15 of values i..i+15 (i a multiple of 16), from 8 bytes
        const __m128i bytes = _mm_loadl_epi64((const __m128i *)((const uint8_t *)base + i / 2));
        const __m128i nibble = _mm_set1_epi8(0x0f);
        const __m128i codes = _mm_unpacklo_epi64(_mm_and_si128(bytes, nibble),
                                                 _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
        return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes));
    }
    default:
        return _mm512_loadu_ps((const float *)base + i);
    }
}

// e^x for x <= 0 (softmax after subtracting the max): 2^(x log2 e) split into an integer power,
// set in the exponent bits, and a degree-6 polynomial for the fraction; relative error ~2e-7.
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  // below this e^x underflows to 0 anyway
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));  // in [0, ln 2)
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// probs[i] = exp(s[i] - max) / sum over i < len (in place); masked entries hold -INFINITY.
static void softmax(float *s, int64_t len) {
    __m512 vmx = _mm512_set1_ps(-INFINITY);  // the max 16 lanes at a time (scalar: a tenth of the kernel at 16k)
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) vmx = _mm512_max_ps(vmx, _mm512_loadu_ps(s + j));
    float mx = _mm512_reduce_max_ps(vmx);
    for (; j < len; j++) mx = s[j] > mx ? s[j] : mx;
    if (mx == -INFINITY) {  // nothing to attend (fully masked): zeros, not NaN
        memset(s, 0, (size_t)len * sizeof(float));
        return;
    }
    __m512 vmax = _mm512_set1_ps(mx), vsum = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
        __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + i), vmax));
        _mm512_storeu_ps(s + i, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    float sum = _mm512_reduce_add_ps(vsum);
    for (; i < len; i++) {
        s[i] = s[i] == -INFINITY ? 0.0f : expf(s[i] - mx);
        sum += s[i];
    }
    __m512 inv = _mm512_set1_ps(1.0f / sum);
    for (i = 0; i + 16 <= len; i += 16) _mm512_storeu_ps(s + i, _mm512_mul_ps(_mm512_loadu_ps(s + i), inv));
    for (; i < len; i++) s[i] /= sum;
}

// out[g] = sum over attended t of probs[g, t] * v[t] (in order of t), for `group` heads of nv * 16
// values; heads in chunks whose sums fit in 16 registers, each value row read once per chunk.
// An int4 row is code * scale + min: the sum takes p * scale times the codes, and p * min once
// per position into a scalar that is added to every value at the end.
static inline __attribute__((always_inline)) void weigh_values(const void *v, const float *vscale,
                                                               const uint8_t *mask, const float *scores, float *out,
                                                               int group, int64_t len, int kind, const int NV) {
    enum { ACC = 16 };
    const int GC = NV < ACC ? ACC / NV : 1, d = 16 * NV, meta = meta_of(kind);
    for (int g0 = 0; g0 < group; g0 += GC) {
        const int gn = group - g0 < GC ? group - g0 : GC;
        __m512 acc[ACC];  // GC * NV <= 16 (NV <= 16)
        float mins[ACC] = {0};
        for (int i = 0; i < GC * NV; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t t = 0; t < len; t++) {
            if (mask && !mask[t]) continue;
            __m512 row[16];
            for (int j = 0; j < NV; j++) row[j] = load16(v, kind, (size_t)t * d + j * 16);
            const float rs = vscale ? vscale[t * meta] : 1.0f;
            for (int g = 0; g < GC; g++) {
                if (g >= gn) break;
                const float prob = scores[(g0 + g) * len + t];
                const __m512 p = _mm512_set1_ps(prob * rs);
                for (int j = 0; j < NV; j++) acc[g * NV + j] = _mm512_fmadd_ps(p, row[j], acc[g * NV + j]);
                if (kind == KIND_I4) mins[g] += prob * vscale[t * 2 + 1];
            }
        }
        for (int g = 0; g < gn; g++)
            for (int j = 0; j < NV; j++)
                _mm512_storeu_ps(out + (g0 + g) * d + j * 16,
                                 _mm512_add_ps(acc[g * NV + j], _mm512_set1_ps(mins[g])));
    }
}

// One (sequence, kv head): `group` query heads against `len` cached positions.
// lane p of the result = the sum of a[p]'s 16 lanes: a transposing tree of shuffles and adds (two
// instructions a position, against eight for a horizontal add per position)
static inline __m512 sums16(const __m512 a[16]) {
    __m512 b[8], c[4];
    for (int p = 0; p < 8; p++)  // 128-bit lanes [a_p(0+2), a_p(1+3), a_p+8(0+2), a_p+8(1+3)]
        b[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a[p], a[p + 8], 0x44), _mm512_shuffle_f32x4(a[p], a[p + 8], 0xEE));
    for (int p = 0; p < 4; p++)  // 128-bit lanes: 4 partial sums of a_p, a_p+8, a_p+4, a_p+12
        c[p] = _mm512_add_ps(_mm512_shuffle_f32x4(b[p], b[p + 4], 0x88), _mm512_shuffle_f32x4(b[p], b[p + 4], 0xDD));
    const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
    const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(c[2], c[3]), _mm512_unpackhi_ps(c[2], c[3]));
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_shuffle_f32x4(r, r, _MM_SHUFFLE(3, 1, 2, 0));  // lanes were a0-3, a8-11, a4-7, a12-15
}

// The scores of positions t..t+15 for `group` query heads (qk: their queries, int4: rescaled for
// the block): 16 dot products a head from the key rows as stored, summed by sums16
static void scores16(const float *qk, const void *k, const float *kscale, int kind, int64_t t, int d, int group,
                     int64_t len, float softmax_scale, const float *shift, float *scores) {
    enum { MAXV = 16 };
    const int nv = d / 16;
    const __m512 rs = kind == KIND_I4 ? _mm512_set1_ps(1.0f)
                      : kscale ? _mm512_mul_ps(_mm512_set1_ps(softmax_scale), _mm512_loadu_ps(kscale + t))
                               : _mm512_set1_ps(softmax_scale);
    __m512 acc[3][16];  // up to 3 query heads a pass (GQA groups of MiniCPM-1B / SmolLM2), rows loaded once
    for (int g0 = 0; g0 < group; g0 += 3) {
        const int gn = group - g0 < 3 ? group - g0 : 3;
        for (int p = 0; p < 16; p++) {
            for (int g = 0; g < gn; g++) acc[g][p] = _mm512_setzero_ps();
            for (int j = 0; j < nv; j++) {
                const __m512 row = load16(k, kind, (size_t)(t + p) * d + j * 16);
                for (int g = 0; g < gn; g++)
                    acc[g][p] = _mm512_fmadd_ps(_mm512_loadu_ps(qk + (g0 + g) * d + j * 16), row, acc[g][p]);
            }
        }
        for (int g = 0; g < gn; g++)
            _mm512_storeu_ps(scores + (g0 + g) * len + t,
                             _mm512_add_ps(_mm512_mul_ps(sums16(acc[g]), rs), _mm512_set1_ps(shift[g0 + g])));
    }
}

// int4 keys: kscale is the (sequence, kv head)'s first block and pos0 the absolute position of t = 0.
static void attend(const float *q, const void *k, const void *v, const float *kscale, const float *vscale,
                   const uint8_t *mask, float *out, float *scores, int group, int64_t len, int d, int kind,
                   float softmax_scale, int64_t pos0) {
    enum { MAXV = 16 };  // head_dim up to 256
    const int nv = d / 16;
    // int4 keys are code * scale[i] + min[i] per channel within a block: q.k = (q * scale).codes +
    // q.min, so each block rescales the queries once and shifts their scores by a constant
    float qblock[kind == KIND_I4 ? group * d : 1], shift[group];
    const float *qk = kind == KIND_I4 ? qblock : q;
    for (int g = 0; g < group; g++) shift[g] = 0;
    for (int64_t t = 0, block = -1; t < len; t++) {
        if (kind == KIND_I4 && (pos0 + t) / KEY_BLOCK != block) {
            block = (pos0 + t) / KEY_BLOCK;
            const float *scale = kscale + block * 2 * d, *min = scale + d;
            for (int g = 0; g < group; g++) {
                shift[g] = 0;
                for (int i = 0; i < d; i++) {
                    qblock[g * d + i] = q[g * d + i] * scale[i] * softmax_scale;
                    shift[g] += q[g * d + i] * min[i];
                }
                shift[g] *= softmax_scale;
            }
        }
        // 16 positions at once where they share the queries (int4: the same block)
        const int64_t run = kind == KIND_I4 ? (block + 1) * KEY_BLOCK - pos0 : len;
        if (t + 16 <= (run < len ? run : len)) {
            scores16(qk, k, kscale, kind, t, d, group, len, softmax_scale, shift, scores);
            for (int64_t p = t; p < t + 16 && mask; p++)
                if (!mask[p])
                    for (int g = 0; g < group; g++) scores[g * len + p] = -INFINITY;
            t += 15;
            continue;
        }
        if (mask && !mask[t]) {
            for (int g = 0; g < group; g++) scores[g * len + t] = -INFINITY;
            continue;
        }
        __m512 row[MAXV];
        for (int j = 0; j < nv; j++) row[j] = load16(k, kind, (size_t)t * d + j * 16);
        const float rs = kind == KIND_I4 ? 1.0f : softmax_scale * (kscale ? kscale[t] : 1.0f);
        for (int g = 0; g < group; g++) {
            __m512 acc = _mm512_setzero_ps();
            for (int j = 0; j < nv; j++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qk + g * d + j * 16), row[j], acc);
            scores[g * len + t] = _mm512_reduce_add_ps(acc) * rs + shift[g];
        }
    }
    for (int g = 0; g < group; g++) softmax(scores + g * len, len);
    switch (nv) {  // a constant NV: the sums stay in registers
    case 4: weigh_values(v, vscale, mask, scores, out, group, len, kind, 4); break;
    case 8: weigh_values(v, vscale, mask, scores, out, group, len, kind, 8); break;
    default: weigh_values(v, vscale, mask, scores, out, group, len, kind, nv);
    }
}

static int valid_rows(const int64_t *rows, const int64_t *starts, const int64_t *ends, int64_t batch,
                      int64_t slots, int64_t len) {
    for (int64_t b = 0; b < batch; b++) {
        int64_t row = rows ? rows[b] : b, lo = starts ? starts[b] : 0, hi = ends ? ends[b] : len;
        if (row < 0 || row >= slots || lo < 0 || lo > hi || hi > len) return 0;
    }
    return 1;
}

// Query heads [h0, h0 + n) of sequence b, all of one kv head; scores: n * len floats. A head's
// scores, softmax and sums do not depend on which other heads share the call, so any split of a
// group gives the same bits.
static void heads_of(const float *q, const void *k, const void *v, const float *kscale, const float *vscale,
                     const uint8_t *mask, const int64_t *rows, const int64_t *starts, const int64_t *ends, float *out,
                     int64_t b, int64_t h0, int64_t n, int64_t heads, int64_t kv_heads, int64_t max_len, int64_t len,
                     int64_t d, int kind, float softmax_scale, float *scores) {
    // bytes of one position's head vector, and fp32 numbers of its scale/min
    const size_t row_bytes = kind == KIND_F32 ? 4 * d : kind == KIND_I8 ? d : kind == KIND_I4 ? d / 2 : 2 * d;
    const int meta = meta_of(kind);
    const int64_t head = h0 / (heads / kv_heads);
    const int64_t row = rows ? rows[b] : b, hi = ends ? ends[b] : len;
    int64_t lo = starts ? starts[b] : 0;
    // left padding: begin at the first attended position, so that the row's sums run as
    // they would without the padding (a masked position adds nothing, but shifts them)
    while (mask && lo < hi && !mask[b * len + lo]) lo++;
    float *o = out + (b * heads + h0) * d;
    if (hi == lo) {  // nothing to attend: zeros, as a fully masked row
        memset(o, 0, (size_t)n * d * sizeof(float));
        return;
    }
    // the row's first position: its stores, scales and mask all start there (int4 keys' scales
    // at the head's first block)
    const size_t head_at = (size_t)(row * kv_heads + head), first = head_at * max_len + lo;
    const float *keys_meta = kind == KIND_I4 ? kscale + head_at * (max_len / KEY_BLOCK) * 2 * d
                             : kscale ? kscale + first * meta : NULL;
    attend(q + (b * heads + h0) * d, (const char *)k + first * row_bytes, (const char *)v + first * row_bytes,
           keys_meta, vscale ? vscale + first * meta : NULL, mask ? mask + b * len + lo : NULL, o,
           scores, (int)n, hi - lo, (int)d, kind, softmax_scale, lo);
}

static int refused(const int64_t *rows, const int64_t *starts, const int64_t *ends, int64_t batch, int64_t slots,
                   int64_t heads, int64_t kv_heads, int64_t max_len, int64_t len, int64_t d, int kind) {
    return d % 16 || d > 256 || heads % kv_heads || len > max_len || len < 1
           || (kind == KIND_I4 && max_len % KEY_BLOCK)
           || !valid_rows(rows, starts, ends, batch, slots, len);
}

// Thread tid's share (of nt) of the (sequence, query head) pairs, inside a caller's parallel
// region, in runs that share a kv head (its keys and values are read once per run); scores:
// (heads / kv_heads) * len floats of its own. Split by query head, not kv head: a model with
// 3 kv heads would leave one of 2 threads twice the other's work. Returns 0, or -1 (on every
// thread) for a shape this kernel does not take.
int minicpm_decode_attention_team(const float *q, const void *k, const void *v, const float *kscale,
                                  const float *vscale, const uint8_t *mask, const int64_t *rows,
                                  const int64_t *starts, const int64_t *ends, float *out, int64_t batch,
                                  int64_t slots, int64_t heads, int64_t kv_heads, int64_t max_len, int64_t len,
                                  int64_t d, int kind, float softmax_scale, int tid, int nt, float *scores) {
    if (refused(rows, starts, ends, batch, slots, heads, kv_heads, max_len, len, d, kind)) return -1;
    const int64_t group = heads / kv_heads, pairs = batch * heads, end = pairs * (tid + 1) / nt;
    for (int64_t u = pairs * tid / nt, next; u < end; u = next) {
        const int64_t b = u / heads, h = u % heads, group_end = b * heads + (h / group + 1) * group;
        next = group_end < end ? group_end : end;
        heads_of(q, k, v, kscale, vscale, mask, rows, starts, ends, out, b, h, next - u, heads, kv_heads, max_len,
                 len, d, kind, softmax_scale, scores);
    }
    return 0;
}

// Returns 0, or -1 for a shape this kernel does not take (the caller falls back).
int minicpm_decode_attention(const float *q, const void *k, const void *v, const float *kscale,
                             const float *vscale, const uint8_t *mask, const int64_t *rows,
                             const int64_t *starts, const int64_t *ends, float *out, int64_t batch,
                             int64_t slots, int64_t heads, int64_t kv_heads, int64_t max_len, int64_t len,
                             int64_t d, int kind, float softmax_scale, int threads) {
    if (refused(rows, starts, ends, batch, slots, heads, kv_heads, max_len, len, d, kind)) return -1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc((size_t)(heads / kv_heads) * len * sizeof(float));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        } else {
            minicpm_decode_attention_team(q, k, v, kscale, vscale, mask, rows, starts, ends, out, batch, slots,
                                          heads, kv_heads, max_len, len, d, kind, softmax_scale,
                                          omp_get_thread_num(), omp_get_num_threads(), scores);
        }
        free(scores);
    }
    return failed ? -2 : 0;
}

// ---- Prefill: S new queries per sequence against the L = past + S keys they may see ----------
//
// Causal with the queries at the end (query i sits at position L - S + i and sees keys 0..L-S+i),
// which is both a fresh prompt (L = S) and a chunk of one after `past` cached positions; or, with
// causal = 0, every query sees every key (a vision encoder's patches). Flash
// style: each kv head's keys and values are converted to fp32 once (keys transposed in tiles of
// KT, so that 16 scores are one vector), then per (head, tile of QT queries) the key tiles go by
// with a running max and sum per query (online softmax): no S x L score matrix exists. Scores,
// softmax and sums are fp32 whatever q (fp32 or bf16) and k/v (fp32, bf16, or an int8/int4
// cache's codes with their scales, read as stored) are; strides in elements (int4: in values),
// head_dim contiguous.

enum { QT = 64, KT = 32, NK = KT / 16 };  // NK vectors of 16 scores per key tile

struct heads_view {        // one of q, k, v: base and element strides of [batch, heads, positions, d]
    const void *p;
    int64_t sb, sh, ss;
    const float *meta;     // int8/int4 caches: per (batch, head, position) scale (and min), else NULL;
                           // int4 keys: per (batch, head, block) scales [d] then mins [d]
    int64_t mb, mh, ms;    // its strides in floats (int4 keys: ms per block)
};

// values [i, i + 16) of position pos of head h of sequence b, as fp32
static inline __m512 row16(const struct heads_view *t, int kind, int64_t b, int64_t h, int64_t pos, int i) {
    const __m512 x = load16(t->p, kind, (size_t)(b * t->sb + h * t->sh + pos * t->ss + i));
    if (!t->meta) return x;
    const float *m = t->meta + b * t->mb + h * t->mh + pos * t->ms;
    return kind == KIND_I4 ? _mm512_fmadd_ps(x, _mm512_set1_ps(m[0]), _mm512_set1_ps(m[1]))
                           : _mm512_mul_ps(x, _mm512_set1_ps(m[0]));
}

// key values [i, i + 16) of position pos: int4 keys take their block's scales and mins per channel
static inline __m512 key16(const struct heads_view *t, int kind, int64_t b, int64_t h, int64_t pos, int i, int d) {
    if (kind != KIND_I4) return row16(t, kind, b, h, pos, i);
    const float *m = t->meta + b * t->mb + h * t->mh + pos / KEY_BLOCK * t->ms;
    return _mm512_fmadd_ps(load16(t->p, kind, (size_t)(b * t->sb + h * t->sh + pos * t->ss + i)),
                           _mm512_loadu_ps(m + i), _mm512_loadu_ps(m + d + i));
}

// keys [j0, j0 + n) of one kv head: kt [d][KT] (transposed, so 16 scores are one vector) and
// vf [KT][d], zero past n
static void key_tile(const struct heads_view *k, const struct heads_view *v, int kind, int64_t b, int64_t h,
                     int64_t j0, int n, int d, float *kt, float *vf) {
    float part[16];
    for (int j = 0; j < KT; j++)
        for (int i = 0; i < d; i += 16) {
            _mm512_storeu_ps(part, j < n ? key16(k, kind, b, h, j0 + j, i, d) : _mm512_setzero_ps());
            for (int x = 0; x < 16; x++) kt[(i + x) * KT + j] = part[x];
            _mm512_storeu_ps(vf + j * d + i, j < n ? row16(v, kind, b, h, j0 + j, i) : _mm512_setzero_ps());
        }
}

// Query rows go RB at a time: their sums are independent chains (one row's 64-long FMA chain
// would leave the FMA units waiting on latency). On AVX2 8 rows of scores spill 16 registers:
// 2 rows ran 28% faster there (Zen 3, 128 and 512 queries over 512 keys, 24 heads of 64).
#ifdef MC_EMULATED
enum { RB = 2 };
#else
enum { RB = 8 };
#endif

// s[r][c] = rows[r] . keys of the transposed tile kt (16 keys per c), RB rows d floats apart
static inline void tile_products(const float *rows, const float *kt, int d, __m512 s[RB][NK]) {
    for (int r = 0; r < RB; r++)
        for (int c = 0; c < NK; c++) s[r][c] = _mm512_setzero_ps();
    for (int i = 0; i < d; i++) {
        __m512 kv[NK];
        for (int c = 0; c < NK; c++) kv[c] = _mm512_loadu_ps(kt + i * KT + 16 * c);
        for (int r = 0; r < RB; r++) {
            const __m512 x = _mm512_set1_ps(rows[r * d + i]);
            for (int c = 0; c < NK; c++) s[r][c] = _mm512_fmadd_ps(x, kv[c], s[r][c]);
        }
    }
}

// RB query rows against a key tile (rows past `rows` are padding): each row's scores of its first
// valid[r] keys (the rest masked), its running max m and sum l updated, its output row o rescaled
// and accumulated.
static inline void rows_update(const float *qf, const float *kt, const float *vf, float *o, float *m, float *l,
                               const int *valid, int rows, int n, int d) {
    __m512 s[RB][NK];
    tile_products(qf, kt, d, s);
    float pj[RB][KT], corr[RB];
    for (int r = 0; r < RB; r++) {
        const int live_n = r < rows ? valid[r] : 0;
        __mmask16 live[NK];
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int c = 0; c < NK; c++) {
            const int k = live_n - 16 * c;
            live[c] = k >= 16 ? 0xFFFF : k <= 0 ? 0 : (__mmask16)((1u << k) - 1);
            s[r][c] = _mm512_mask_blend_ps(live[c], _mm512_set1_ps(-INFINITY), s[r][c]);
            mx = _mm512_max_ps(mx, s[r][c]);
        }
        const float top = _mm512_reduce_max_ps(mx), m_new = top > m[r] ? top : m[r];
        corr[r] = m_new == -INFINITY ? 1.0f : expf(m[r] - m_new);  // 0 on a row's first keys
        __m512 sum = _mm512_setzero_ps();
        for (int c = 0; c < NK; c++) {
            const __m512 p = _mm512_maskz_mov_ps(live[c], exp_nonpositive(_mm512_sub_ps(s[r][c], _mm512_set1_ps(m_new))));
            sum = _mm512_add_ps(sum, p);
            _mm512_storeu_ps(pj[r] + 16 * c, p);
        }
        l[r] = l[r] * corr[r] + _mm512_reduce_add_ps(sum);
        m[r] = m_new;
    }
    for (int i0 = 0; i0 < d; i0 += 16) {
        __m512 acc[RB];
        for (int r = 0; r < RB; r++) acc[r] = _mm512_mul_ps(_mm512_loadu_ps(o + r * d + i0), _mm512_set1_ps(corr[r]));
        for (int j = 0; j < n; j++) {
            const __m512 vj = _mm512_loadu_ps(vf + j * d + i0);
            for (int r = 0; r < RB; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(pj[r][j]), vj, acc[r]);
        }
        for (int r = 0; r < RB; r++) _mm512_storeu_ps(o + r * d + i0, acc[r]);
    }
}

// (kts, vfs: every key tile of the head's kv head as key_tile lays them out, KT * d floats each)
static void query_tile(const struct heads_view *q, const float *kts, const float *vfs, int qkind, float *out,
                       int64_t b, int64_t h, int64_t heads, int64_t S, int64_t L, int64_t s0, int64_t s1, int d,
                       float scale, int causal, float *work) {
    float *qf = work, *o = qf + (QT + RB) * d, m[QT + RB], l[QT + RB];
    const int64_t past = L - S, rows = s1 - s0;
    for (int64_t r = 0; r < QT + RB; r++) {  // rows past the tile's: zeros, so a block may read them
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(qf, 0, sizeof(float) * (QT + RB) * d);
    memset(o, 0, sizeof(float) * (QT + RB) * d);
    for (int64_t r = 0; r < rows; r++) {
        const size_t qo = (size_t)(b * q->sb + h * q->sh + (s0 + r) * q->ss);
        for (int i = 0; i < d; i += 16)
            _mm512_storeu_ps(qf + r * d + i, _mm512_mul_ps(load16(q->p, qkind, qo + i), _mm512_set1_ps(scale)));
    }
    const int64_t keys = causal ? past + s1 : L;  // what the tile's last query sees
    for (int64_t j0 = 0; j0 < keys; j0 += KT) {
        const int n = keys - j0 < KT ? (int)(keys - j0) : KT;
        const float *kt = kts + j0 * d, *vf = vfs + j0 * d;  // tile j0 / KT
        for (int64_t r0 = 0; r0 < rows; r0 += RB) {
            // keys of this tile row r0 may see (all n when not causal)
            const int64_t first = causal ? past + s0 + r0 + 1 - j0 : n;
            if (first + RB - 1 <= 0) continue;  // none for any row of the block
            int valid[RB];
            for (int r = 0; r < RB; r++) {
                const int64_t seen = causal ? first + r : n;
                valid[r] = seen <= 0 ? 0 : seen < n ? (int)seen : n;
            }
            rows_update(qf + r0 * d, kt, vf, o + r0 * d, m + r0, l + r0, valid,
                        rows - r0 < RB ? (int)(rows - r0) : RB, n, d);
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        float *dst = out + ((b * S + s0 + r) * heads + h) * d;
        const float inv = 1.0f / l[r];
        for (int i = 0; i < d; i++) dst[i] = o[r * d + i] * inv;
    }
}

// softmax(q k^T * scale, causal or not) v for q [B, H, S, d] and k, v [B, KV, L, d] (L >= S; strides
// {batch, head, position} in elements, int4 in values), into out [B, S, H, d] fp32. qkind: 0 fp32,
// 1 bf16; kvkind: the same, or 3 int8 / 4 int4 codes with kmeta/vmeta (scale, int4 values: scale
// and min) at float strides kms/vms {batch, head, position} (int4 keys: {batch, head, block} of
// the per-channel block scales, see the top). Returns 0, -1 for a shape or kind it does not take,
// -2 when out of memory.
int minicpm_flash_attention(const void *q, const int64_t *qs, const void *k, const int64_t *ks, const void *v,
                            const int64_t *vs, const float *kmeta, const float *vmeta, const int64_t *kms,
                            const int64_t *vms, float *out, int qkind, int kind, int64_t batch, int64_t heads,
                            int64_t kv_heads, int64_t S, int64_t L, int64_t d, float scale, int causal, int threads) {
    if (d % 16 || d > 256 || heads % kv_heads || S < 1 || L < S || (qkind != KIND_F32 && qkind != KIND_BF16)
        || kind == KIND_F16 || kind > KIND_I4 || (kind >= KIND_I8) != (kmeta && vmeta && kms && vms))
        return -1;
    const struct heads_view qv = {q, qs[0], qs[1], qs[2], NULL, 0, 0, 0},
                            kv = {k, ks[0], ks[1], ks[2], kmeta, kms ? kms[0] : 0, kms ? kms[1] : 0, kms ? kms[2] : 0},
                            vv = {v, vs[0], vs[1], vs[2], vmeta, vms ? vms[0] : 0, vms ? vms[1] : 0, vms ? vms[2] : 0};
    const int64_t tiles = (S + QT - 1) / QT, group = heads / kv_heads, key_tiles = (L + KT - 1) / KT;
    // one kv head's keys and values converted once for all its query heads and tiles (converting
    // them per query tile cost a third of the time): 8 bytes per position and dimension
    float *kts = aligned_alloc(64, sizeof(float) * (size_t)(key_tiles * KT * d));
    float *vfs = aligned_alloc(64, sizeof(float) * (size_t)(key_tiles * KT * d));
    int failed = !kts || !vfs;
    if (!failed) {
#pragma omp parallel num_threads(threads)
        {
            float *work = aligned_alloc(64, sizeof(float) * (size_t)(2 * (QT + RB)) * d);
            if (!work) {
#pragma omp atomic write
                failed = 1;
            }
            for (int64_t bk = 0; bk < batch * kv_heads; bk++) {
                const int64_t b = bk / kv_heads, kvh = bk % kv_heads;
#pragma omp for schedule(static)
                for (int64_t j = 0; j < key_tiles; j++)
                    key_tile(&kv, &vv, kind, b, kvh, j * KT, L - j * KT < KT ? (int)(L - j * KT) : KT, (int)d,
                             kts + j * KT * d, vfs + j * KT * d);
                // the last query tiles see the most keys: hand them out first
#pragma omp for schedule(dynamic, 1)
                for (int64_t u = 0; u < group * tiles; u++) {
                    if (!work) continue;
                    const int64_t h = kvh * group + u / tiles, t = tiles - 1 - u % tiles;
                    const int64_t s0 = t * QT, s1 = s0 + QT < S ? s0 + QT : S;
                    query_tile(&qv, kts, vfs, qkind, out, b, h, heads, S, L, s0, s1, (int)d, scale, causal, work);
                }
            }
            free(work);
        }
    }
    free(kts);
    free(vfs);
    return failed ? -2 : 0;
}

// ---- A prompt chunk inside a caller's parallel region (decode.c's step) ------------------------
//
// The S query rows of one sequence, fp32 q [S, H, d] at positions past..past+S-1, against the keys
// 0..past+S-1 its cache row holds (the chunk's own just written), causal, into out [S, H, d]: the
// arithmetic of minicpm_flash_attention, without its region. The decode path above reads each key
// once per query row (a 128-row chunk: 128 times, scores summed across lanes); here a kv head's keys
// are converted once per thread and every query tile of the head reuses them.
//
// Thread tid of nt takes a contiguous share of the (kv head, query head, query tile) units and
// converts the key tiles of each kv head it meets into its own work (chunk_attention_floats): no
// barrier, no allocation. Where a share splits a kv head, both threads convert it. A tile's result
// does not depend on the split, so any number of threads gives the same bits.

static int64_t key_tiles_of(int64_t len) { return (len + KT - 1) / KT; }

// floats of one thread's work for a chunk seeing `len` positions: converted keys and values, and
// query_tile's rows
int64_t minicpm_chunk_attention_floats(int64_t len, int64_t d) {
    return 2 * key_tiles_of(len) * KT * d + 2 * (QT + RB) * d;
}

// kind: the cache's (fp32, bf16, fp16, int8, int4; its layouts as minicpm_decode_attention's, one cache
// row of `slots`). Returns 0, or -1 for a shape or kind it does not take.
int minicpm_chunk_attention_team(const float *q, const void *k, const void *v, const float *kscale,
                                 const float *vscale, int64_t row, int64_t slots, int64_t heads, int64_t kv_heads,
                                 int64_t max_len, int64_t past, int64_t S, int64_t d, int kind, float scale, float *out,
                                 int tid, int nt, float *work) {
    const int64_t L = past + S;
    if (d % 16 || d > 256 || heads % kv_heads || S < 1 || past < 0 || L > max_len || row < 0 || row >= slots
        || kind > KIND_I4 || (kind >= KIND_I8) != (kscale && vscale)
        || (kind == KIND_I4 && max_len % KEY_BLOCK))
        return -1;
    const int64_t meta = meta_of(kind), blocks = max_len / KEY_BLOCK;
    const struct heads_view qv = {q, 0, d, heads * d, NULL, 0, 0, 0},
        kv = {k, kv_heads * max_len * d, max_len * d, d, kscale,
              kind == KIND_I4 ? kv_heads * blocks * 2 * d : kv_heads * max_len,
              kind == KIND_I4 ? blocks * 2 * d : max_len, kind == KIND_I4 ? 2 * d : 1},
        vv = {v, kv_heads * max_len * d, max_len * d, d, vscale, kv_heads * max_len * meta, max_len * meta, meta};
    const int64_t group = heads / kv_heads, tiles = (S + QT - 1) / QT, key_tiles = key_tiles_of(L);
    const int64_t per_head = group * tiles, units = kv_heads * per_head, end = units * (tid + 1) / nt;
    float *kts = work, *vfs = kts + key_tiles * KT * d, *rows_work = vfs + key_tiles * KT * d;
    for (int64_t u = units * tid / nt, converted = -1; u < end; u++) {
        const int64_t kvh = u / per_head, h = kvh * group + u % per_head / tiles, t = u % tiles;
        if (kvh != converted) {
            for (int64_t j = 0; j < key_tiles; j++)
                key_tile(&kv, &vv, kind, row, kvh, j * KT, L - j * KT < KT ? (int)(L - j * KT) : KT, (int)d,
                         kts + j * KT * d, vfs + j * KT * d);
            converted = kvh;
        }
        const int64_t s0 = t * QT, s1 = s0 + QT < S ? s0 + QT : S;
        query_tile(&qv, kts, vfs, KIND_F32, out, 0, h, heads, S, L, s0, s1, (int)d, scale, 1, rows_work);
    }
    return 0;
}

// ---- Gradients of causal self-attention (training) ---------------------------------------------
//
// One sequence of S positions: q, out, dout [H, S, d] and k, v [KV, S, d] (strides in elements
// {head, position}, head_dim contiguous; fp32 or bf16, all of one kind), query i seeing keys 0..i.
// Writes dq [H, S, d] and dk, dv [KV, S, d], fp32 contiguous. PyTorch's CPU flash backward ran at
// ~45 GFLOP/s here (9 heads over 3, 512 positions: 16.5 ms against 12 for the forward); a fifth of
// a LoRA step. No S x S matrix: (1) each query row's log-sum-exp and delta = dout . out; (2) per
// (kv head, key tile) dk and dv of the tile over every query row of the group's heads that sees
// it; (3) per (query head, query tile) dq. (2) and (3) recompute the probabilities p = e^(s - lse)
// and score gradients ds = p (dout . v - delta) from q, k, v and (1)'s numbers.

// how many keys the tile starting at j0 holds
static inline int tile_keys(int64_t S, int64_t j0) { return S - j0 < KT ? (int)(S - j0) : KT; }

// which of the tile's keys j0 + 16c + lane query row i sees (j <= i, within the n keys)
static inline __mmask16 seen16(int64_t i, int64_t j0, int c, int n) {
    int64_t k = i - j0 + 1 - 16 * c;
    if (k > n - 16 * c) k = n - 16 * c;
    return k >= 16 ? 0xFFFF : k <= 0 ? 0 : (__mmask16)((1u << k) - 1);
}

struct grad_tiles {                 // one sequence, everything fp32
    const float *qf, *dof;          // [H, S (+ RB zero rows), d]: q and dout
    const float *kt, *vt, *kr;      // per kv head: key tiles transposed [tiles][d][KT], value tiles
                                    // the same, keys as rows [tiles * KT][d]
    const float *lse, *delta;       // [H, S]
    int64_t S, tiles;
    int d;
    float scale;
};

// p and ds [RB][KT] of query rows i0.. (rows of them real) of head h against key tile jt of kv head g
static void tile_grads(const struct grad_tiles *t, int64_t h, int64_t g, int64_t i0, int rows, int64_t jt,
                       float p[RB][KT], float ds[RB][KT]) {
    const int64_t j0 = jt * KT, S = t->S;
    const int n = tile_keys(S, j0), d = t->d;
    const size_t tile = (size_t)(g * t->tiles + jt) * KT * d;
    __m512 s[RB][NK], dp[RB][NK];
    tile_products(t->qf + (h * S + i0) * d, t->kt + tile, d, s);
    tile_products(t->dof + (h * S + i0) * d, t->vt + tile, d, dp);
    for (int r = 0; r < RB; r++) {
        const float lse = r < rows ? t->lse[h * S + i0 + r] : 0.0f, delta = r < rows ? t->delta[h * S + i0 + r] : 0.0f;
        for (int c = 0; c < NK; c++) {
            const __mmask16 live = r < rows ? seen16(i0 + r, j0, c, n) : 0;
            // s * scale <= lse up to rounding (a hair above 0 is still e^x)
            const __m512 e = exp_nonpositive(
                _mm512_sub_ps(_mm512_mul_ps(s[r][c], _mm512_set1_ps(t->scale)), _mm512_set1_ps(lse)));
            const __m512 pr = _mm512_maskz_mov_ps(live, e);
            _mm512_storeu_ps(p[r] + 16 * c, pr);
            _mm512_storeu_ps(ds[r] + 16 * c, _mm512_mul_ps(pr, _mm512_sub_ps(dp[r][c], _mm512_set1_ps(delta))));
        }
    }
}

// (1) for query rows [i0, i0 + rows) of head h: lse from the scores (online max and sum), delta
static void row_stats(const struct grad_tiles *t, const void *out, const void *dout, int64_t osh, int64_t oss,
                      int64_t dsh, int64_t dss, int kind, int64_t h, int64_t g, int64_t i0, int rows, float *lse,
                      float *delta) {
    const int64_t S = t->S;
    const int d = t->d;
    float m[RB], l[RB];
    for (int r = 0; r < RB; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    for (int64_t jt = 0; jt * KT <= i0 + rows - 1; jt++) {
        const int64_t j0 = jt * KT;
        const int n = tile_keys(S, j0);
        __m512 s[RB][NK];
        tile_products(t->qf + (h * S + i0) * d, t->kt + (size_t)(g * t->tiles + jt) * KT * d, d, s);
        for (int r = 0; r < rows; r++) {
            __mmask16 live[NK];
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (int c = 0; c < NK; c++) {
                live[c] = seen16(i0 + r, j0, c, n);
                s[r][c] = _mm512_mask_blend_ps(live[c], _mm512_set1_ps(-INFINITY),
                                               _mm512_mul_ps(s[r][c], _mm512_set1_ps(t->scale)));
                mx = _mm512_max_ps(mx, s[r][c]);
            }
            const float top = _mm512_reduce_max_ps(mx);
            if (top == -INFINITY) continue;
            const float m_new = top > m[r] ? top : m[r];
            __m512 sum = _mm512_setzero_ps();
            for (int c = 0; c < NK; c++)
                sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(live[c], exp_nonpositive(
                                             _mm512_sub_ps(s[r][c], _mm512_set1_ps(m_new)))));
            l[r] = l[r] * expf(m[r] - m_new) + _mm512_reduce_add_ps(sum);
            m[r] = m_new;
        }
    }
    for (int r = 0; r < rows; r++) {
        lse[r] = m[r] + logf(l[r]);
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < d; i += 16)
            acc = _mm512_fmadd_ps(load16(out, kind, (size_t)(h * osh + (i0 + r) * oss + i)),
                                  load16(dout, kind, (size_t)(h * dsh + (i0 + r) * dss + i)), acc);
        delta[r] = _mm512_reduce_add_ps(acc);
    }
}

// (2) dk, dv of key tile jt of kv head g: acc_k, acc_v [KT][d] work
static void key_tile_grads(const struct grad_tiles *t, int64_t g, int64_t group, int64_t jt, float *dk, float *dv,
                           float *acc_k, float *acc_v) {
    const int64_t S = t->S, j0 = jt * KT;
    const int n = tile_keys(S, j0), d = t->d;
    float p[RB][KT], ds[RB][KT];
    memset(acc_k, 0, sizeof(float) * KT * d);
    memset(acc_v, 0, sizeof(float) * KT * d);
    for (int64_t h = g * group; h < (g + 1) * group; h++)
        for (int64_t i0 = j0 / RB * RB; i0 < S; i0 += RB) {  // rows before j0 see none of these keys
            const int rows = S - i0 < RB ? (int)(S - i0) : RB;
            tile_grads(t, h, g, i0, rows, jt, p, ds);
            const float *qr = t->qf + (h * S + i0) * d, *dor = t->dof + (h * S + i0) * d;
            for (int j = 0; j < n; j++)
                for (int i = 0; i < d; i += 16) {
                    __m512 ak = _mm512_loadu_ps(acc_k + j * d + i), av = _mm512_loadu_ps(acc_v + j * d + i);
                    for (int r = 0; r < rows; r++) {
                        ak = _mm512_fmadd_ps(_mm512_set1_ps(ds[r][j]), _mm512_loadu_ps(qr + r * d + i), ak);
                        av = _mm512_fmadd_ps(_mm512_set1_ps(p[r][j]), _mm512_loadu_ps(dor + r * d + i), av);
                    }
                    _mm512_storeu_ps(acc_k + j * d + i, ak);
                    _mm512_storeu_ps(acc_v + j * d + i, av);
                }
        }
    for (int j = 0; j < n; j++)
        for (int i = 0; i < d; i += 16) {
            _mm512_storeu_ps(dk + ((g * S) + j0 + j) * d + i,
                             _mm512_mul_ps(_mm512_loadu_ps(acc_k + j * d + i), _mm512_set1_ps(t->scale)));
            _mm512_storeu_ps(dv + ((g * S) + j0 + j) * d + i, _mm512_loadu_ps(acc_v + j * d + i));
        }
}

// (3) dq of query rows [i0, i0 + rows) of head h
static void query_rows_grads(const struct grad_tiles *t, int64_t h, int64_t g, int64_t i0, int rows, float *dq) {
    const int64_t S = t->S;
    const int d = t->d;
    float p[RB][KT], ds[RB][KT];
    for (int i = 0; i < d; i += 16)
        for (int r = 0; r < rows; r++) _mm512_storeu_ps(dq + (h * S + i0 + r) * d + i, _mm512_setzero_ps());
    for (int64_t jt = 0; jt * KT <= i0 + rows - 1; jt++) {
        const int64_t j0 = jt * KT;
        const int n = tile_keys(S, j0);
        tile_grads(t, h, g, i0, rows, jt, p, ds);
        const float *kr = t->kr + (size_t)(g * t->tiles + jt) * KT * d;
        for (int i = 0; i < d; i += 16) {
            __m512 acc[RB];
            for (int r = 0; r < RB; r++) acc[r] = _mm512_setzero_ps();
            for (int j = 0; j < n; j++) {
                const __m512 kj = _mm512_loadu_ps(kr + j * d + i);
                for (int r = 0; r < RB; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(ds[r][j]), kj, acc[r]);
            }
            for (int r = 0; r < rows; r++) {
                float *dst = dq + (h * S + i0 + r) * d + i;
                _mm512_storeu_ps(dst, _mm512_fmadd_ps(acc[r], _mm512_set1_ps(t->scale), _mm512_loadu_ps(dst)));
            }
        }
    }
}

// qs, ks, vs, os, dos: {head, position} strides. Returns 0, -1 for a shape or kind it does not
// take, -2 when out of memory.
int minicpm_causal_attention_backward(const void *q, const int64_t *qs, const void *k, const int64_t *ks,
                                      const void *v, const int64_t *vs, const void *out, const int64_t *os,
                                      const void *dout, const int64_t *dos, float *dq, float *dk, float *dv,
                                      int kind, int64_t heads, int64_t kv_heads, int64_t S, int64_t d, float scale,
                                      int threads) {
    if (d % 16 || d > 256 || heads % kv_heads || S < 1 || (kind != KIND_F32 && kind != KIND_BF16)) return -1;
    const int64_t group = heads / kv_heads, tiles = key_tiles_of(S), rows_all = heads * S + RB;
    float *qf = aligned_alloc(64, sizeof(float) * (size_t)(2 * rows_all * d + 2 * heads * S));
    float *kt = aligned_alloc(64, sizeof(float) * (size_t)(4 * kv_heads * tiles * KT * d));
    if (!qf || !kt) {
        free(qf);
        free(kt);
        return -2;
    }
    float *dof = qf + rows_all * d, *lse = dof + rows_all * d, *delta = lse + heads * S;
    float *vt = kt + kv_heads * tiles * KT * d, *kr = vt + kv_heads * tiles * KT * d, *vr = kr + kv_heads * tiles * KT * d;
    const struct grad_tiles t = {qf, dof, kt, vt, kr, lse, delta, S, tiles, (int)d, scale};
    const struct heads_view kv = {k, 0, ks[0], ks[1], NULL, 0, 0, 0}, vv = {v, 0, vs[0], vs[1], NULL, 0, 0, 0};
    int failed = 0;
    memset(qf + heads * S * d, 0, sizeof(float) * RB * d);  // rows past the last: a block may read them
    memset(dof + heads * S * d, 0, sizeof(float) * RB * d);
#pragma omp parallel num_threads(threads)
    {
        float *work = aligned_alloc(64, sizeof(float) * 2 * KT * (size_t)d);
        if (!work) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t hs = 0; hs < heads * S; hs++) {
            const int64_t h = hs / S, i = hs % S;
            for (int64_t x = 0; x < d; x += 16) {
                _mm512_storeu_ps(qf + hs * d + x, load16(q, kind, (size_t)(h * qs[0] + i * qs[1] + x)));
                _mm512_storeu_ps(dof + hs * d + x, load16(dout, kind, (size_t)(h * dos[0] + i * dos[1] + x)));
            }
        }
#pragma omp for schedule(static)
        for (int64_t u = 0; u < kv_heads * tiles; u++) {
            const int64_t g = u / tiles, j0 = u % tiles * KT;
            const int n = tile_keys(S, j0);
            // key_tile lays out one tensor transposed and the other as rows: called twice for k and v
            // transposed and k as rows (v as rows, vr, is not read)
            key_tile(&kv, &vv, kind, 0, g, j0, n, (int)d, kt + u * KT * d, vr + u * KT * d);
            key_tile(&vv, &kv, kind, 0, g, j0, n, (int)d, vt + u * KT * d, kr + u * KT * d);
        }
        const int64_t blocks = (S + RB - 1) / RB;
#pragma omp for schedule(dynamic, 4)
        for (int64_t u = 0; u < heads * blocks; u++) {
            const int64_t h = u / blocks, i0 = u % blocks * RB;
            row_stats(&t, out, dout, os[0], os[1], dos[0], dos[1], kind, h, h / group, i0,
                      S - i0 < RB ? (int)(S - i0) : RB, lse + h * S + i0, delta + h * S + i0);
        }
        // the first key tiles are seen by the most rows: hand them out first
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < kv_heads * tiles; u++)
            if (work) key_tile_grads(&t, u % kv_heads, group, u / kv_heads, dk, dv, work, work + KT * d);
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < heads * blocks; u++) {  // the last rows see the most keys
            const int64_t h = u % heads, i0 = (blocks - 1 - u / heads) * RB;
            query_rows_grads(&t, h, h / group, i0, S - i0 < RB ? (int)(S - i0) : RB, dq);
        }
        free(work);
    }
    free(qf);
    free(kt);
    return failed ? -2 : 0;
}
