/* How a decoding step in C shares its work over threads, and how it writes its token: shared by
   window_decode.c and sparse_decode.c.

   A unit is one row's key/value head (B * HKV of them), with its G query heads. Where the units do not
   share out evenly over the threads (3 key/value heads on 2 threads at batch 1) each query head is a work
   item of its own (P = G parts a unit), else each unit is one item (P = 1). The unit's first part writes
   what the unit writes once (its token; the window hybrid's next state). */

#ifndef ZOO_DECODE_ITEMS_H
#define ZOO_DECODE_ITEMS_H

#include <stdint.h>
#include <string.h>

/* The parts a unit is cut into (see above). */
static inline int64_t item_parts(int64_t units, int64_t G, int threads) {
    return threads > 1 && units % threads ? G : 1;
}

/* Work item i of P parts a unit: unit u, part `part`, its query heads g0 to g0 + Gs - 1, the first of
   them query head `first` of the batch (u * G + g0). */
typedef struct {
    int64_t u, part, g0, Gs, first;
} WorkItem;

static inline WorkItem work_item(int64_t i, int64_t P, int64_t G) {
    WorkItem it;
    it.u = i / P;
    it.part = i % P;
    it.g0 = it.part * G / P;
    it.Gs = (it.part + 1) * G / P - it.g0;
    it.first = it.u * G + it.g0;
    return it;
}

/* A unit's token, its key k [D], value v [DV] and key features fk [F], into slot `slot` of the unit's
   key, value and feature buffers. */
static inline void write_token(float *keys, float *vals, float *feats, int64_t slot, const float *k,
                               const float *v, const float *fk, int64_t D, int64_t DV, int64_t F) {
    memcpy(keys + slot * D, k, (size_t)D * sizeof(float));
    memcpy(vals + slot * DV, v, (size_t)DV * sizeof(float));
    memcpy(feats + slot * F, fk, (size_t)F * sizeof(float));
}

#endif
