/* Hedgehog's feature map of one vector, shared by the C kernels that include it:
   out[2 * F2] = [softmax(x W), softmax(-x W)] for x [D] and W [D, F2] (row-major), times `scale`. */

#ifndef ZOO_HEDGEHOG_H
#define ZOO_HEDGEHOG_H

#include <math.h>
#include <stdint.h>

static void hedgehog_map(const float *x, const float *W, int64_t D, int64_t F2, float scale, float *out) {
    float *pos = out, *neg = out + F2;
    for (int64_t f = 0; f < F2; f++) pos[f] = 0.0f;
    for (int64_t d = 0; d < D; d++) { /* x W, row by row of W */
        const float xd = x[d];
        const float *row = W + d * F2;
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
    const float ip = scale / sp, in = scale / sn;
    for (int64_t f = 0; f < F2; f++) {
        pos[f] *= ip;
        neg[f] *= in;
    }
}

#endif
