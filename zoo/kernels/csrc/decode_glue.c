/* The small passes between a decoder layer's matrix products when it decodes one token a row: the RMS norm,
   the rotary embedding of the queries and keys, and the MLP's SiLU gate. Each is a few hundred floats a row;
   as PyTorch ops (five for the norm, seven for a rotation) they cost 20-90 us apiece on a 2-core CPU whose
   caches the weights have just swept, against 1-3 us for one of these calls. fp32, contiguous, one thread
   (the work is too small to share). */

#include <math.h>
#include <stdint.h>

#include "vmath.h"

/* out[r, :] = w * x[r, :] / sqrt(mean(x[r, :]^2) + eps) for each of `rows` rows of `dim` floats (the
   Llama-family RMS norm; out may be x) */
void zoo_rms_norm_f32(int64_t rows, int64_t dim, const float *x, const float *w, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < dim; i++) sum += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(sum / (float)dim + eps);
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) o[i] = w[i] * (xr[i] * inv);
    }
}

/* x[r, h, :] = x * cos[r] + rotate_half(x) * sin[r] in place, for `rows` rows of `heads` heads of `dim`
   floats; cos and sin [rows, dim] (the rotary tables of each row's position, as transformers makes them:
   the first half's frequencies repeated), rotate_half(x) = (-x[dim/2:], x[:dim/2]) */
void zoo_rotate_heads_f32(int64_t rows, int64_t heads, int64_t dim, float *x, const float *cos,
                          const float *sin) {
    const int64_t half = dim / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * dim, *s = sin + r * dim;
        for (int64_t h = 0; h < heads; h++) {
            float *lo = x + (r * heads + h) * dim, *hi = lo + half;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float a = lo[i], b = hi[i];
                lo[i] = a * c[i] - b * s[i];
                hi[i] = b * c[half + i] + a * s[half + i];
            }
        }
    }
}

/* gate[i] = silu(gate[i]) * up[i] in place, for n floats (the Llama-family MLP's act_fn(gate) * up) */
void zoo_silu_mul_f32(int64_t n, float *gate, const float *up) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) gate[i] = gate[i] / (1.0f + vexpf(-gate[i])) * up[i];
}
