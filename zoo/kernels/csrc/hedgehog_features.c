/* Hedgehog feature maps of one token per row, fused: phi(x) = [softmax(x W), softmax(-x W)] per head.

   x [R, n, D]: R rows of n heads; W [n, D, F2]: one map per head; out [R, n, 2 * F2], fp32, contiguous.
   It computes what zoo/mixers/features.py's `hedgehog_features(HeadwiseLinear(x))` computes, in one call
   instead of a matmul, a negation, two softmaxes and a concatenation. */

#include <math.h>
#include <stdint.h>

void zoo_hedgehog_features_f32(int64_t R, int64_t n, int64_t D, int64_t F2, const float *x, const float *W,
                               float *out) {
    for (int64_t r = 0; r < R; r++) {
        for (int64_t h = 0; h < n; h++) {
            const float *xv = x + (r * n + h) * D, *w = W + h * D * F2;
            float *pos = out + (r * n + h) * 2 * F2, *neg = pos + F2;
            for (int64_t f = 0; f < F2; f++) pos[f] = 0.0f;
            for (int64_t d = 0; d < D; d++) { /* x W, row by row of W */
                const float xd = xv[d];
                const float *row = w + d * F2;
#pragma omp simd
                for (int64_t f = 0; f < F2; f++) pos[f] += xd * row[f];
            }
            float hi = -INFINITY, lo = INFINITY;
            for (int64_t f = 0; f < F2; f++) {
                if (pos[f] > hi) hi = pos[f];
                if (pos[f] < lo) lo = pos[f];
            }
            float sp = 0.0f, sn = 0.0f;
            for (int64_t f = 0; f < F2; f++) { /* softmax(h) with its max hi, softmax(-h) with its max -lo */
                neg[f] = expf(lo - pos[f]);
                pos[f] = expf(pos[f] - hi);
                sp += pos[f];
                sn += neg[f];
            }
            const float ip = 1.0f / sp, in = 1.0f / sn;
            for (int64_t f = 0; f < F2; f++) {
                pos[f] *= ip;
                neg[f] *= in;
            }
        }
    }
}
