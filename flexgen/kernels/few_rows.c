/*
 * y = x @ w^T + bias in float32 for a few rows of x: the products of a decode step on the CPU.
 *
 * A decode step multiplies every weight matrix (N x K, row-major) by one row per sequence of
 * the batch (M <= 64). Each weight element is read from memory once per step and used M
 * times, so the product is bound by arithmetic, and general-purpose GEMM kernels, tuned for
 * many rows, reach about half of what two AVX2 cores can do on it (flexgen/linear.py has the
 * figures). This kernel computes it as dot products along K, which reads the weight in the
 * layout it is stored in (no packing pass over it):
 *
 *   - a tile of 4 rows of x by 3 rows of w keeps 12 accumulators of 8 floats in registers,
 *     fed by 7 vector loads per 12 fused multiply-adds (16 AVX2 registers in all);
 *   - the threads split the rows of w (the output columns), so each weight element is read
 *     from memory exactly once per call; within a thread, the 3 rows of w under work stay
 *     in the L1 cache while every 4-row tile of x passes over them, and the first tile
 *     prefetches the next 3 rows;
 *   - K is taken in chunks of KC floats so that x's chunk (M x KC) stays in the L2 cache;
 *     each chunk's sums are added to y, the first one to the bias;
 *   - the loop over K has no branch inside (the prefetching tile has its own loop, one line
 *     of each next row per 64 bytes of K), and a tile's twelve lane sums are taken three at a
 *     time with horizontal adds and added to y with one masked store per row of x: with the
 *     per-iteration prefetch test and one scalar sum per accumulator, the tile ran 3-10 %
 *     slower on OPT's matrices streamed from memory, and at two thirds of the FMA units'
 *     rate with everything in L1.
 *
 * The weight may also be float16 or bfloat16 (a model kept in half precision on a CPU that
 * computes it in float32): each 8 values are widened to float32 in registers as they are
 * loaded, exactly, so the products and their order of summation are those of the float32
 * weight, while half the bytes are read and no float32 copy of the weight is ever written.
 *
 * The sums run in a different order from BLAS's: results differ from F.linear in the last
 * bits, as those of two BLAS kernels do. Compiled at first use by flexgen/kernels/build.py
 * with -mavx2 -mfma -mf16c, and called only where the CPU has all three.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "vectors.h"

#define MR 4      /* rows of x per tile */
#define NR 3      /* rows of w per tile */
#define KC 4096   /* values of K per chunk: 64 rows of x take 1 MiB */

/* The lane sums of a, b and c in the first three lanes (the fourth repeats c's). */
static inline __m128 sums3(__m256 a, __m256 b, __m256 c) {
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, c));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* Which of a row's first lanes a tile of nr columns writes, by nr. */
static const int32_t COLUMN_MASKS[NR + 1][4] = {{0, 0, 0, 0}, {-1, 0, 0, 0}, {-1, -1, 0, 0}, {-1, -1, -1, 0}};

/* One step of a tile: 8 values of K, at k, from every row of x and w under work. */
#define TILE_STEP(T, mr, nr, k)                                                                  \
    do {                                                                                         \
        __m256 b[nr];                                                                            \
        for (int j = 0; j < nr; j++) b[j] = load8_##T(w + j * ldw + (k));                        \
        for (int i = 0; i < mr; i++) {                                                           \
            __m256 a = _mm256_loadu_ps(x + i * ldx + (k));                                       \
            for (int j = 0; j < nr; j++) acc[i][j] = _mm256_fmadd_ps(a, b[j], acc[i][j]);        \
        }                                                                                        \
    } while (0)

/* y[i][j] += sum over k < kc of x[i][k] * w[j][k], for i < mr, j < nr; prefetch, if not
 * null, points at the next rows of w (same stride), fetched into the cache meanwhile, one
 * 64-byte line per row at a time. */
#define DEFINE_TILE(T, type, mr, nr)                                                             \
    static void tile_##T##_##mr##x##nr(const float *x, int64_t ldx, const type *w, int64_t ldw, \
                                       float *y, int64_t ldy, int64_t kc, const type *prefetch) { \
        __m256 acc[mr][nr];                                                                      \
        for (int i = 0; i < mr; i++)                                                             \
            for (int j = 0; j < nr; j++) acc[i][j] = _mm256_setzero_ps();                        \
        int64_t k = 0;                                                                           \
        if (prefetch) {                                                                          \
            enum { LINE = 64 / (int)sizeof(type) }; /* values of K in a cache line */           \
            for (; k + LINE <= kc; k += LINE) {                                                  \
                for (int j = 0; j < nr; j++)                                                     \
                    _mm_prefetch((const char *)(prefetch + j * ldw + k), _MM_HINT_T0);           \
                for (int u = 0; u < LINE; u += 8) TILE_STEP(T, mr, nr, k + u);                   \
            }                                                                                    \
        }                                                                                        \
        for (; k + 8 <= kc; k += 8) TILE_STEP(T, mr, nr, k);                                     \
        __m128i columns = _mm_loadu_si128((const __m128i *)COLUMN_MASKS[nr]);                  \
        for (int i = 0; i < mr; i++) {                                                           \
            __m128 s = sums3(acc[i][0], acc[i][nr > 1 ? 1 : 0], acc[i][nr > 2 ? 2 : 0]);         \
            if (k < kc) { /* K's last values, fewer than 8 */                                    \
                float sum[4];                                                                    \
                _mm_storeu_ps(sum, s);                                                           \
                for (int j = 0; j < nr; j++)                                                     \
                    for (int64_t t = k; t < kc; t++)                                             \
                        sum[j] = fmaf(x[i * ldx + t], load1_##T(w + j * ldw + t), sum[j]);       \
                s = _mm_loadu_ps(sum);                                                           \
            }                                                                                    \
            float *out = y + i * ldy;                                                            \
            _mm_maskstore_ps(out, columns, _mm_add_ps(_mm_maskload_ps(out, columns), s));        \
        }                                                                                        \
    }

/* Every tile shape for one weight type, the table of them, and one thread's share of the
 * product: rows [n0, n1) of w against all M rows of x. */
#define DEFINE_KERNEL(T, type)                                                                   \
    DEFINE_TILE(T, type, 4, 3) DEFINE_TILE(T, type, 4, 2) DEFINE_TILE(T, type, 4, 1)             \
    DEFINE_TILE(T, type, 3, 3) DEFINE_TILE(T, type, 3, 2) DEFINE_TILE(T, type, 3, 1)             \
    DEFINE_TILE(T, type, 2, 3) DEFINE_TILE(T, type, 2, 2) DEFINE_TILE(T, type, 2, 1)             \
    DEFINE_TILE(T, type, 1, 3) DEFINE_TILE(T, type, 1, 2) DEFINE_TILE(T, type, 1, 1)             \
                                                                                                 \
    typedef void (*tile_fn_##T)(const float *, int64_t, const type *, int64_t, float *, int64_t, \
                                int64_t, const type *);                                          \
    static const tile_fn_##T TILES_##T[MR + 1][NR + 1] = {                                       \
        {0, 0, 0, 0},                                                                            \
        {0, tile_##T##_1x1, tile_##T##_1x2, tile_##T##_1x3},                                     \
        {0, tile_##T##_2x1, tile_##T##_2x2, tile_##T##_2x3},                                     \
        {0, tile_##T##_3x1, tile_##T##_3x2, tile_##T##_3x3},                                     \
        {0, tile_##T##_4x1, tile_##T##_4x2, tile_##T##_4x3},                                     \
    };                                                                                           \
                                                                                                 \
    static void columns_##T(const float *x, int64_t m_rows, int64_t k_dim, int64_t ldx,          \
                            const type *w, int64_t ldw, const float *bias, float *y, int64_t ldy, \
                            int64_t n0, int64_t n1) {                                            \
        for (int64_t i = 0; i < m_rows; i++)                                                     \
            for (int64_t n = n0; n < n1; n++) y[i * ldy + n] = bias ? bias[n] : 0.0f;            \
        for (int64_t k0 = 0; k0 < k_dim; k0 += KC) {                                             \
            int64_t kc = k_dim - k0 < KC ? k_dim - k0 : KC;                                      \
            for (int64_t n = n0; n < n1; n += NR) {                                              \
                int nr = n1 - n < NR ? (int)(n1 - n) : NR;                                       \
                const type *next = n + NR + NR <= n1 ? w + (n + NR) * ldw + k0 : 0;              \
                for (int64_t i = 0; i < m_rows; i += MR) {                                       \
                    int mr = m_rows - i < MR ? (int)(m_rows - i) : MR;                           \
                    TILES_##T[mr][nr](x + i * ldx + k0, ldx, w + n * ldw + k0, ldw, y + i * ldy + n, \
                                      ldy, kc, i == 0 ? next : 0);                               \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
    }

DEFINE_KERNEL(f32, float)
DEFINE_KERNEL(f16, uint16_t)
DEFINE_KERNEL(bf16, uint16_t)

/* y (m_rows x n_rows, row stride ldy) = x (m_rows x k_dim, row stride ldx)
 * @ w^T (w: n_rows x k_dim, row stride ldw, of the type w_type names: 0 float32, 1 float16,
 * 2 bfloat16) + bias (n_rows floats, or null), on `threads` threads of the process's OpenMP
 * runtime, each taking a contiguous share of w's rows. */
void flexgen_few_rows_linear(const float *x, int64_t m_rows, int64_t k_dim, int64_t ldx,
                             const void *w, int w_type, int64_t n_rows, int64_t ldw, const float *bias,
                             float *y, int64_t ldy, int threads) {
    int64_t units = (n_rows + NR - 1) / NR;
    if (threads > units) threads = (int)units;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t n0 = units * t / nt * NR, n1 = units * (t + 1) / nt * NR;
        if (n1 > n_rows) n1 = n_rows;
        if (n0 < n1) {
            if (w_type == 1)
                columns_f16(x, m_rows, k_dim, ldx, (const uint16_t *)w, ldw, bias, y, ldy, n0, n1);
            else if (w_type == 2)
                columns_bf16(x, m_rows, k_dim, ldx, (const uint16_t *)w, ldw, bias, y, ldy, n0, n1);
            else
                columns_f32(x, m_rows, k_dim, ldx, (const float *)w, ldw, bias, y, ldy, n0, n1);
        }
    }
}
