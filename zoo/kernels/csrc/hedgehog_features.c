/* Hedgehog feature maps of one token per row, fused: phi(x) = [softmax(x W), softmax(-x W)] per head.

   x [R, n, D]: R rows of n heads; W [n, D, F2]: one map per head; out [R, n, 2 * F2], fp32, contiguous.
   It computes what zoo/mixers/features.py's `hedgehog_features(HeadwiseLinear(x))` computes, in one call
   instead of a matmul, a negation, two softmaxes and a concatenation. */

#include "hedgehog.h"

void zoo_hedgehog_features_f32(int64_t R, int64_t n, int64_t D, int64_t F2, const float *x, const float *W,
                               float *out) {
    for (int64_t r = 0; r < R; r++)
        for (int64_t h = 0; h < n; h++)
            hedgehog_map(x + (r * n + h) * D, W + h * D * F2, D, F2, 1.0f, out + (r * n + h) * 2 * F2);
}
