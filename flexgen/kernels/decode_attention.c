/*
 * Decode attention on the CPU over the engine's (T, B, H, D) float32 cache, read in memory order.
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
 * The scale is 1: the caller's queries are pre-scaled (as for scaled_dot_product_attention
 * with scale=1.0). A row with no valid position gives zeros, as that function does on the CPU
 * (measured with PyTorch 2.13). Compiled at
 * first use by flexgen/kernels/build.py with -mavx2 -mfma, called only where the CPU has both.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

static inline float dot(const float *a, const float *b, int64_t d) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= d; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    __m256 acc = _mm256_add_ps(acc0, acc1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    float r = _mm_cvtss_f32(s);
    for (; i < d; i++) r += a[i] * b[i];
    return r;
}

/* out[i] += p * v[i] for i < d */
static inline void axpy(float *out, float p, const float *v, int64_t d) {
    __m256 pp = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + 8 <= d; i += 8)
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pp, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
    for (; i < d; i++) out[i] += p * v[i];
}

/*
 * q: (B, H, D) with strides (q_sb, q_sh, 1); k, v: (T, B, KVH, D) addressed by strides
 * (st, sb, sh, 1) each; valid: (B, T) bytes with row stride valid_sb, or null for all valid;
 * out: (B, H, D) with strides (o_sb, o_sh, 1); scores: B * H * T floats of scratch.
 * H is a multiple of KVH; query head h reads KV head h / (H / KVH).
 */
void flexgen_decode_attention(const float *q, int64_t batch, int64_t heads, int64_t head_dim, int64_t q_sb,
                              int64_t q_sh, const float *k, int64_t k_st, int64_t k_sb, int64_t k_sh,
                              const float *v, int64_t v_st, int64_t v_sb, int64_t v_sh, int64_t positions,
                              int64_t kv_heads, const uint8_t *valid, int64_t valid_sb, float *out,
                              int64_t o_sb, int64_t o_sh, float *scores, int threads) {
    int64_t group = heads / kv_heads, pairs = batch * kv_heads;
    if (threads > pairs) threads = (int)pairs;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t t_id = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t p0 = pairs * t_id / nt, p1 = pairs * (t_id + 1) / nt;
        /* 1. scores, positions outermost */
        for (int64_t t = 0; t < positions; t++)
            for (int64_t p = p0; p < p1; p++) {
                int64_t b = p / kv_heads, kvh = p % kv_heads;
                float *row = scores + (b * heads + kvh * group) * positions + t;
                if (valid && !valid[b * valid_sb + t]) {
                    for (int64_t g = 0; g < group; g++) row[g * positions] = -INFINITY;
                    continue;
                }
                const float *key = k + t * k_st + b * k_sb + kvh * k_sh;
                for (int64_t g = 0; g < group; g++)
                    row[g * positions] = dot(q + b * q_sb + (kvh * group + g) * q_sh, key, head_dim);
            }
        /* 2. softmax of each row, unnormalised; the output rows start at zero */
        for (int64_t p = p0; p < p1; p++) {
            int64_t b = p / kv_heads, kvh = p % kv_heads;
            for (int64_t g = 0; g < group; g++) {
                float *row = scores + (b * heads + kvh * group + g) * positions;
                float m = -INFINITY;
                for (int64_t t = 0; t < positions; t++) m = row[t] > m ? row[t] : m;
                for (int64_t t = 0; t < positions; t++) row[t] = m == -INFINITY ? 0.0f : expf(row[t] - m);
                float *o = out + b * o_sb + (kvh * group + g) * o_sh;
                for (int64_t i = 0; i < head_dim; i++) o[i] = 0.0f;
            }
        }
        /* 3. weighted values, positions outermost */
        for (int64_t t = 0; t < positions; t++)
            for (int64_t p = p0; p < p1; p++) {
                int64_t b = p / kv_heads, kvh = p % kv_heads;
                if (valid && !valid[b * valid_sb + t]) continue;
                const float *value = v + t * v_st + b * v_sb + kvh * v_sh;
                for (int64_t g = 0; g < group; g++) {
                    int64_t h = kvh * group + g;
                    axpy(out + b * o_sb + h * o_sh, scores[(b * heads + h) * positions + t], value, head_dim);
                }
            }
        /* the softmax's division, once per output row */
        for (int64_t p = p0; p < p1; p++) {
            int64_t b = p / kv_heads, kvh = p % kv_heads;
            for (int64_t g = 0; g < group; g++) {
                int64_t h = kvh * group + g;
                const float *row = scores + (b * heads + h) * positions;
                float sum = 0.0f;
                for (int64_t t = 0; t < positions; t++) sum += row[t];
                float inv = sum > 0.0f ? 1.0f / sum : 0.0f, *o = out + b * o_sb + h * o_sh;
                for (int64_t i = 0; i < head_dim; i++) o[i] *= inv;
            }
        }
    }
}
