/* Hedgehog's feature map of one vector, shared by the C kernels that include it:
   out[2 * F2] = [softmax(x W), softmax(-x W)] for x [D] and W [D, F2] (row-major), times `scale`. */

#ifndef ZOO_HEDGEHOG_H
#define ZOO_HEDGEHOG_H

#include <math.h>
#include <stdint.h>

#include "decode_items.h"
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

/* The features that a work item of a decoding step reads (decode_items.h), F = 2 * F2 per vector: its
   query heads, and with `key` also its unit's key (unit u, key/value head h = u % HKV, G query heads
   each). With maps (maps->Wq set) they are computed from the queries (q at it->first * D) and the key (k at
   u * D) into scratch [Gs * F + F]: the queries' first, then the key's; without, they are the given fq
   [.., G, F] and fk [.., F] at that item. *pfq: the item's first query's features; *ufk: the key's (where
   `key`). */
static inline void item_features(const HedgehogMaps *maps, const WorkItem *it, int64_t HKV, int64_t G,
                                 int key, int64_t D, int64_t F, const float *q, const float *k,
                                 const float *fq, const float *fk, float *scratch, const float **pfq,
                                 const float **ufk) {
    const int64_t h = it->u % HKV, F2 = F / 2;
    if (!maps->Wq) {
        *pfq = fq + it->first * F;
        *ufk = fk + it->u * F;
        return;
    }
    for (int64_t g = 0; g < it->Gs; g++)
        hedgehog_map(q + (it->first + g) * D, maps->Wq + (h * G + it->g0 + g) * D * F2, D, F2,
                     maps->fq_scale, scratch + g * F);
    if (key) hedgehog_map(k + it->u * D, maps->Wk + h * D * F2, D, F2, 1.0f, scratch + it->Gs * F);
    *pfq = scratch;
    *ufk = scratch + it->Gs * F;
}

#endif
