/* Hedgehog's feature map of one vector, shared by the C kernels that include it:
   out[2 * F2] = [softmax(x W), softmax(-x W)] for x [D] and W [D, F2] (row-major), times `scale`. */

#ifndef ZOO_HEDGEHOG_H
#define ZOO_HEDGEHOG_H

#include <math.h>
#include <stdint.h>

#include "vmath.h"

/* The softmaxes of one row of projections: out[2 * F2] = [softmax(h), softmax(-h)] * scale for h [F2].
   h may be out's first half (computed in place). */
static inline void hedgehog_softmaxes(const float *h, int64_t F2, float scale, float *out) {
    float *pos = out, *neg = out + F2;
    float hi = -INFINITY, lo = INFINITY;
#pragma omp simd reduction(max : hi) reduction(min : lo)
    for (int64_t f = 0; f < F2; f++) {
        hi = h[f] > hi ? h[f] : hi;
        lo = h[f] < lo ? h[f] : lo;
    }
    float sp = 0.0f, sn = 0.0f;
#pragma omp simd reduction(+ : sp, sn)
    for (int64_t f = 0; f < F2; f++) { /* softmax(h) with its max hi, softmax(-h) with its max -lo */
        const float x = h[f];
        neg[f] = vexpf(lo - x);
        pos[f] = vexpf(x - hi);
        sp += pos[f];
        sn += neg[f];
    }
    const float ip = scale / sp, in = scale / sn;
#pragma omp simd
    for (int64_t f = 0; f < F2; f++) {
        pos[f] *= ip;
        neg[f] *= in;
    }
}

static inline void hedgehog_map(const float *x, const float *W, int64_t D, int64_t F2, float scale,
                                float *out) {
    float *pos = out;
    for (int64_t f = 0; f < F2; f++) pos[f] = 0.0f;
    for (int64_t d = 0; d < D; d++) { /* x W, row by row of W */
        const float xd = x[d];
        const float *row = W + d * F2;
#pragma omp simd
        for (int64_t f = 0; f < F2; f++) pos[f] += xd * row[f];
    }
    hedgehog_softmaxes(pos, F2, scale, out);
}

/* A layer's Hedgehog maps: Wq [HKV * G, D, F2], one per query head, and Wk [HKV, D, F2], one per key/value
   head; Wq NULL: the caller gives the features instead. fq_scale multiplies the queries' features. */
typedef struct {
    const float *Wq, *Wk;
    float fq_scale;
} HedgehogMaps;

/* Key/value head h's features: its G queries q [G, D] into fq [G, 2 * F2], its key k [D] into fk [2 * F2]. */
static inline void hedgehog_group(const HedgehogMaps *maps, int64_t h, int64_t G, int64_t D, int64_t F2,
                                  const float *q, const float *k, float *fq, float *fk) {
    for (int64_t g = 0; g < G; g++)
        hedgehog_map(q + g * D, maps->Wq + (h * G + g) * D * F2, D, F2, maps->fq_scale, fq + g * 2 * F2);
    hedgehog_map(k, maps->Wk + h * D * F2, D, F2, 1.0f, fk);
}

/* The features that unit u (a row's key/value head h = u % HKV) of a decoding step reads, F = 2 * F2 per
   vector: with maps (maps->Wq set) computed from its G queries (q at u * G * D) and its key (k at u * D)
   into scratch [G * F + F]; without, the given fq [.., G, F] and fk [.., F] at that unit. */
static inline void unit_features(const HedgehogMaps *maps, int64_t u, int64_t HKV, int64_t G, int64_t D,
                                 int64_t F, const float *q, const float *k, const float *fq, const float *fk,
                                 float *scratch, const float **ufq, const float **ufk) {
    if (maps->Wq) {
        hedgehog_group(maps, u % HKV, G, D, F / 2, q + u * G * D, k + u * D, scratch, scratch + G * F);
        *ufq = scratch;
        *ufk = scratch + G * F;
    } else {
        *ufq = fq + u * G * F;
        *ufk = fk + u * F;
    }
}

#endif
