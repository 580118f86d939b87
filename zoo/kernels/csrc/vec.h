/* Small vector helpers shared by zoo's C kernels (vectorized by the compiler: -O3 with OpenMP's simd). */

#ifndef ZOO_VEC_H
#define ZOO_VEC_H

#include <stdint.h>

/* x . y over n floats */
static inline float dot(const float *restrict x, const float *restrict y, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += x[i] * y[i];
    return s;
}

/* out[n] += w * x[n] */
static inline void axpy(float *restrict out, float w, const float *restrict x, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) out[i] += w * x[i];
}

/* out[n] = g * old[n] + w * x[n]; old NULL: out[n] = w * x[n] (a decayed row of a state plus a write) */
static inline void decay_axpy(float *restrict out, const float *restrict old, float g, float w,
                              const float *restrict x, int64_t n) {
    if (old) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) out[i] = g * old[i] + w * x[i];
    } else {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) out[i] = w * x[i];
    }
}

#endif
