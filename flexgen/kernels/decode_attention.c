/*
 * Decode attention on the CPU over the engine's (T, B, H, D) cache, read in memory order.
 *
 * One query per (sequence, head) meets every cached key and value once: the work is reading
 * the cache. The engine keeps it position-major, (T, B, H, D), so that a step appends one
 * contiguous row; a (sequence, head)'s keys are then D floats every B*H*D. PyTorch's
 * attention walks each (sequence, head) over its positions, a stride the hardware prefetchers
 * do not follow across pages: measured on this project's 2-core CI machine at opt-350m's
 * shape (32 sequences, 16 heads, 48 positions, D = 64), 8 GB/s, a third of what the memory
 * gives. Here every thread takes a contiguous range of (sequence, KV head) pairs and walks
 * the positions outermost, so each position's rows of that range are one contiguous run:
 *
 *   1. scores: s[t] = q . k[t] for every query of the range (grouped-query heads share their
 *      KV head's keys), -inf where the position is not valid;
 *   2. softmax of each row of scores (max subtracted, in float32);
 *   3. output: sum over t of p[t] * v[t], accumulated in the output rows (L2-resident), then
 *      divided by the softmax's sum.
 *
 * The cache may be float32, float16 or bfloat16 (one of them for both keys and values): a
 * half-precision cache (CPU delegation keeps the GPU's float16 cache on the host) is widened to
 * float32 in registers as it is read, 8 values at a time, so it is read once, at half the bytes,
 * and never copied; every sum is in float32. Queries and the output are float32.
 *
 * The scale is 1: the caller's queries are pre-scaled (as for scaled_dot_product_attention
 * with scale=1.0). A row with no valid position gives zeros, as that function does on the CPU
 * (measured with PyTorch 2.13). Compiled at first use by flexgen/kernels/build.py with -mavx2
 * -mfma -mf16c, called only where the CPU has all three.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "vectors.h"

/* dot_T(a, b, d): a (floats) . b (the cache's type); axpy_T(out, p, v, d): out[i] += p * v[i]. */
#define DEFINE_VECTOR_OPS(T, type)                                                                 \
    static inline float dot_##T(const float *a, const type *b, int64_t d) {                       \
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();                            \
        int64_t i = 0;                                                                             \
        for (; i + 16 <= d; i += 16) {                                                             \
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8_##T(b + i), acc0);                \
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8_##T(b + i + 8), acc1);        \
        }                                                                                          \
        for (; i + 8 <= d; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8_##T(b + i), acc0); \
        float r = sum8(_mm256_add_ps(acc0, acc1));                                                 \
        for (; i < d; i++) r += a[i] * load1_##T(b + i);                                           \
        return r;                                                                                  \
    }                                                                                              \
    static inline void axpy_##T(float *out, float p, const type *v, int64_t d) {                  \
        __m256 pp = _mm256_set1_ps(p);                                                             \
        int64_t i = 0;                                                                             \
        for (; i + 8 <= d; i += 8)                                                                 \
            _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pp, load8_##T(v + i), _mm256_loadu_ps(out + i))); \
        for (; i < d; i++) out[i] += p * load1_##T(v + i);                                         \
    }

DEFINE_VECTOR_OPS(f32, float)
DEFINE_VECTOR_OPS(f16, uint16_t)
DEFINE_VECTOR_OPS(bf16, uint16_t)

/* The attention of pairs [p0, p1) of (sequence, KV head): one thread's share; see below for the
 * arguments. */
#define DEFINE_ATTENTION(T, type)                                                                  \
    static void attention_##T(const float *q, int64_t heads, int64_t head_dim, int64_t q_sb,      \
                              int64_t q_sh, const type *k, int64_t k_st, int64_t k_sb, int64_t k_sh, \
                              const type *v, int64_t v_st, int64_t v_sb, int64_t v_sh,            \
                              int64_t positions, int64_t kv_heads, const uint8_t *valid,          \
                              int64_t valid_sb, float *out, int64_t o_sb, int64_t o_sh,           \
                              float *scores, int64_t p0, int64_t p1) {                            \
        int64_t group = heads / kv_heads;                                                          \
        /* 1. scores, positions outermost */                                                       \
        for (int64_t t = 0; t < positions; t++)                                                    \
            for (int64_t p = p0; p < p1; p++) {                                                    \
                int64_t b = p / kv_heads, kvh = p % kv_heads;                                      \
                float *row = scores + (b * heads + kvh * group) * positions + t;                   \
                if (valid && !valid[b * valid_sb + t]) {                                           \
                    for (int64_t g = 0; g < group; g++) row[g * positions] = -INFINITY;            \
                    continue;                                                                      \
                }                                                                                  \
                const type *key = k + t * k_st + b * k_sb + kvh * k_sh;                            \
                for (int64_t g = 0; g < group; g++)                                                \
                    row[g * positions] = dot_##T(q + b * q_sb + (kvh * group + g) * q_sh, key, head_dim); \
            }                                                                                      \
        /* 2. softmax of each row, unnormalised; the output rows start at zero */                  \
        for (int64_t p = p0; p < p1; p++) {                                                        \
            int64_t b = p / kv_heads, kvh = p % kv_heads;                                          \
            for (int64_t g = 0; g < group; g++) {                                                  \
                float *row = scores + (b * heads + kvh * group + g) * positions;                   \
                float m = -INFINITY;                                                               \
                for (int64_t t = 0; t < positions; t++) m = row[t] > m ? row[t] : m;               \
                for (int64_t t = 0; t < positions; t++) row[t] = m == -INFINITY ? 0.0f : expf(row[t] - m); \
                float *o = out + b * o_sb + (kvh * group + g) * o_sh;                              \
                for (int64_t i = 0; i < head_dim; i++) o[i] = 0.0f;                                \
            }                                                                                      \
        }                                                                                          \
        /* 3. weighted values, positions outermost */                                              \
        for (int64_t t = 0; t < positions; t++)                                                    \
            for (int64_t p = p0; p < p1; p++) {                                                    \
                int64_t b = p / kv_heads, kvh = p % kv_heads;                                      \
                if (valid && !valid[b * valid_sb + t]) continue;                                   \
                const type *value = v + t * v_st + b * v_sb + kvh * v_sh;                          \
                for (int64_t g = 0; g < group; g++) {                                              \
                    int64_t h = kvh * group + g;                                                   \
                    axpy_##T(out + b * o_sb + h * o_sh, scores[(b * heads + h) * positions + t], value, head_dim); \
                }                                                                                  \
            }                                                                                      \
        /* the softmax's division, once per output row */                                          \
        for (int64_t p = p0; p < p1; p++) {                                                        \
            int64_t b = p / kv_heads, kvh = p % kv_heads;                                          \
            for (int64_t g = 0; g < group; g++) {                                                  \
                int64_t h = kvh * group + g;                                                       \
                const float *row = scores + (b * heads + h) * positions;                           \
                float sum = 0.0f;                                                                  \
                for (int64_t t = 0; t < positions; t++) sum += row[t];                             \
                float inv = sum > 0.0f ? 1.0f / sum : 0.0f, *o = out + b * o_sb + h * o_sh;        \
                for (int64_t i = 0; i < head_dim; i++) o[i] *= inv;                                \
            }                                                                                      \
        }                                                                                          \
    }

DEFINE_ATTENTION(f32, float)
DEFINE_ATTENTION(f16, uint16_t)
DEFINE_ATTENTION(bf16, uint16_t)

/*
 * q: (B, H, D) floats with strides (q_sb, q_sh, 1); k, v: (T, B, KVH, D) addressed by strides
 * (st, sb, sh, 1) each, of the type kv_type names (0 float32, 1 float16, 2 bfloat16); valid:
 * (B, T) bytes with row stride valid_sb, or null for all valid; out: (B, H, D) floats with
 * strides (o_sb, o_sh, 1); scores: B * H * T floats of scratch. H is a multiple of KVH; query
 * head h reads KV head h / (H / KVH).
 */
void flexgen_decode_attention(const float *q, int64_t batch, int64_t heads, int64_t head_dim, int64_t q_sb,
                              int64_t q_sh, const void *k, int64_t k_st, int64_t k_sb, int64_t k_sh,
                              const void *v, int64_t v_st, int64_t v_sb, int64_t v_sh, int64_t positions,
                              int64_t kv_heads, int kv_type, const uint8_t *valid, int64_t valid_sb, float *out,
                              int64_t o_sb, int64_t o_sh, float *scores, int threads) {
    int64_t pairs = batch * kv_heads;
    if (threads > pairs) threads = (int)pairs;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t t_id = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t p0 = pairs * t_id / nt, p1 = pairs * (t_id + 1) / nt;
        if (kv_type == 1)
            attention_f16(q, heads, head_dim, q_sb, q_sh, (const uint16_t *)k, k_st, k_sb, k_sh, (const uint16_t *)v,
                          v_st, v_sb, v_sh, positions, kv_heads, valid, valid_sb, out, o_sb, o_sh, scores, p0, p1);
        else if (kv_type == 2)
            attention_bf16(q, heads, head_dim, q_sb, q_sh, (const uint16_t *)k, k_st, k_sb, k_sh, (const uint16_t *)v,
                           v_st, v_sb, v_sh, positions, kv_heads, valid, valid_sb, out, o_sb, o_sh, scores, p0, p1);
        else
            attention_f32(q, heads, head_dim, q_sb, q_sh, (const float *)k, k_st, k_sb, k_sh, (const float *)v, v_st,
                          v_sb, v_sh, positions, kv_heads, valid, valid_sb, out, o_sb, o_sh, scores, p0, p1);
    }
}
