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

/* The features that a work item of a decoding step reads, F = 2 * F2 per vector: the item is query heads
   g0 to g0 + Gs - 1 of unit u (a row's key/value head h = u % HKV, G query heads each), and with `key` also
   the unit's key. With maps (maps->Wq set) they are computed from the queries (q at (u * G + g0) * D) and
   the key (k at u * D) into scratch [Gs * F + F]: the queries' first, then the key's; without, they are the
   given fq [.., G, F] and fk [.., F] at that item. *pfq: the item's first query's features; *ufk: the
   key's (where `key`). */
static inline void item_features(const HedgehogMaps *maps, int64_t u, int64_t HKV, int64_t G, int64_t g0,
                                 int64_t Gs, int key, int64_t D, int64_t F, const float *q, const float *k,
                                 const float *fq, const float *fk, float *scratch, const float **pfq,
                                 const float **ufk) {
    const int64_t first = u * G + g0, h = u % HKV, F2 = F / 2;
    if (!maps->Wq) {
        *pfq = fq + first * F;
        *ufk = fk + u * F;
        return;
    }
    for (int64_t g = 0; g < Gs; g++)
        hedgehog_map(q + (first + g) * D, maps->Wq + (h * G + g0 + g) * D * F2, D, F2, maps->fq_scale,
                     scratch + g * F);
    if (key) hedgehog_map(k + u * D, maps->Wk + h * D * F2, D, F2, 1.0f, scratch + Gs * F);
    *pfq = scratch;
    *ufk = scratch + Gs * F;
}

/* A decoding step's work items: each unit's G query heads in P parts (P = G: a query head an item, where the
   units do not share out evenly over the threads, as 3 key/value heads on 2 threads at batch 1; else one
   item a unit). Item i is part i % P of unit i / P. */
static inline int64_t item_parts(int64_t units, int64_t G, int threads) {
    return threads > 1 && units % threads ? G : 1;
}

/* The query heads of part `part` of P: g0 to g0 + *Gs - 1 of a unit's G. */
static inline void item_heads(int64_t part, int64_t P, int64_t G, int64_t *g0, int64_t *Gs) {
    *g0 = part * G / P;
    *Gs = (part + 1) * G / P - *g0;
}

#endif
