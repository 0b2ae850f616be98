/*
 * What the native kernels share: eight float32 lanes loaded from float32, float16 or bfloat16
 * memory (and one value, for loop tails), and the sum of a vector's lanes.
 *
 * Widening is exact (every float16 and bfloat16 value is a float32 value), so a kernel that
 * reads half precision this way computes the very numbers it would from a float32 copy. float16
 * uses F16C (compile with -mf16c); bfloat16 is the upper half of a float32, a 16-bit shift.
 * Included by the kernels' .c files; flexgen/kernels/build.py hashes it with them.
 */
#ifndef FLEXGEN_VECTORS_H
#define FLEXGEN_VECTORS_H

#include <immintrin.h>
#include <stdint.h>

static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline float load1_f32(const float *p) { return *p; }
static inline __m256 load8_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline float load1_f16(const uint16_t *p) { return _cvtsh_ss(*p); }
static inline __m256 load8_bf16(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline float load1_bf16(const uint16_t *p) {
    union { uint32_t u; float f; } bits = {(uint32_t)*p << 16};
    return bits.f;
}

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif
