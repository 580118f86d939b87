/* exp and log1p written so that the compiler vectorizes loops over them (-O3 with OpenMP's simd): libm's
   expf is a call per element, which made a softmax over millions of rows several times slower than the
   memory traffic it needs. Relative error about 1e-7 (a degree-7 polynomial after range reduction). */

#ifndef ZOO_VMATH_H
#define ZOO_VMATH_H

#include <stdint.h>
#include <string.h>

/* e^x for any float x: 0 below -104 (where e^x leaves even the subnormal floats), infinity above 88.72 */
static inline float vexpf(float x) {
    const int below = x < -103.9f, above = x > 88.7228f;
    x = below ? -103.9f : (above ? 88.7228f : x);
    /* x = n ln2 + r, |r| <= ln2 / 2: n rounded by adding and taking away 1.5 * 2^23 (floorf does not
       vectorize without -ffast-math) */
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    /* 2^n as 2^half * 2^(n - half), each a normal float for n in [-150, 128] */
    const int32_t whole = (int32_t)n, half = whole / 2;
    const int32_t bits_a = (half + 127) << 23, bits_b = (whole - half + 127) << 23;
    float scale_a, scale_b;
    memcpy(&scale_a, &bits_a, sizeof scale_a);
    memcpy(&scale_b, &bits_b, sizeof scale_b);
    return below ? 0.0f : (above ? __builtin_inff() : p * scale_a * scale_b);
}

/* log(1 + u) for 0 <= u <= 1: 2 atanh(s) with s = u / (2 + u) <= 1/3, its odd series to s^15. */
static inline float vlog1p_unit(float u) {
    const float s = u / (2.0f + u), s2 = s * s;
    float p = 1.0f / 15.0f;
    p = p * s2 + 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return 2.0f * s * p;
}

/* log sigmoid(x) = min(x, 0) - log(1 + e^-|x|), for any float x. */
static inline float vlogsigmoidf(float x) {
    const float a = x < 0.0f ? -x : x;
    return (x < 0.0f ? x : 0.0f) - vlog1p_unit(vexpf(-a));
}

#endif
