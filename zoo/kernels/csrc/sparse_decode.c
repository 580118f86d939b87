/* LoLA's decoding step (zoo/kernels/sparse_cache.py), fused, for a token that does not end its block: one
   token per row, fp32, every row at one position n (past its sinks).

   The query's softmax keys are the open sinks, the cache's used entries, the previous block (once there is
   one) and the current block's first r = n mod W tokens, then the token itself; the linear keys are in
   S, z (no eviction happens at such a token, so S and z do not change):

     y = (a sum_j e^{q.k_j*scale - m} v_j + b phi(q) S) / (a sum_j e^{q.k_j*scale - m} + b phi(q) . z)

   Shapes (contiguous, row-major; HKV key/value heads, G query heads each):
     q [B, HKV, G, D], fq [B, HKV, G, F]; k [B, HKV, D], v [B, HKV, DV], fk [B, HKV, F]; a, b [HKV * G]
     sink_k [B, HKV, S, D], sink_v [B, HKV, S, DV]; cache_k [B, HKV, C, D], cache_v [B, HKV, C, DV]
     prev_k [B, HKV, W, D], prev_v [B, HKV, W, DV]; cur_k, cur_v, cur_f [B, HKV, W, D / DV / F]
     state [B, HKV, F, DV], norm [B, HKV, F]
   Output y [B, HKV, G, DV]; the token's k, v, fk are written into slot r of cur_k, cur_v, cur_f.
   Returns 0, or 1 when the scratch space could not be had.

   zoo_hedgehog_sparse_decode_f32 takes, instead of fq and fk, the Hedgehog maps Wq [HKV * G, D, F / 2]
   and Wk [HKV, D, F / 2] and computes the features itself (hedgehog.h), the queries' scaled by fq_scale. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hedgehog.h"
#include "vec.h"

typedef struct {
    int64_t D, DV, F, W, S, C, open_sinks, cached, prev_on, r;
} Columns;

/* The key (or value, with values = 1) of softmax column j of unit u's group. */
static const float *column(const Columns *c, int64_t j, int values, const float *sink, const float *cache,
                           const float *prev, const float *cur, const float *token) {
    const int64_t width = values ? c->DV : c->D;
    if (j < c->open_sinks) return sink + j * width;
    j -= c->open_sinks;
    if (j < c->cached) return cache + j * width;
    j -= c->cached;
    if (c->prev_on) {
        if (j < c->W) return prev + j * width;
        j -= c->W;
    }
    return j < c->r ? cur + j * width : token;
}

static int decode_units(const Columns *c, const HedgehogMaps *maps, int64_t B, int64_t HKV,
                        int64_t G, const float *q, const float *fq, const float *k, const float *v,
                        const float *fk,
                        const float *a, const float *b, const float *sink_k, const float *sink_v,
                        const float *cache_k, const float *cache_v, const float *prev_k,
                        const float *prev_v, float *cur_k, float *cur_v, float *cur_f, const float *state,
                        const float *norm, float scale, float *y, int threads) {
    const int64_t D = c->D, DV = c->DV, F = c->F, W = c->W, S = c->S, C = c->C, r = c->r;
    const int64_t N = c->open_sinks + c->cached + (c->prev_on ? W : 0) + r + 1, units = B * HKV;
    const int64_t scratch = N + (maps->Wq ? G * F + F : 0);
    int failed = 0;
#pragma omp parallel for num_threads(threads) if (threads > 1 && units > 1) reduction(| : failed)
    for (int64_t u = 0; u < units; u++) {
        float *w = (float *)malloc((size_t)scratch * sizeof(float));
        if (w == NULL) {
            failed = 1;
            continue;
        }
        const int64_t h = u % HKV;
        const float *ufq, *ufk;
        unit_features(maps, u, HKV, G, D, F, q, k, fq, fk, w + N, &ufq, &ufk);
        const float *sk = sink_k + u * S * D, *sv = sink_v + u * S * DV;
        const float *ck = cache_k + u * C * D, *cv = cache_v + u * C * DV;
        const float *pk = prev_k + u * W * D, *pv = prev_v + u * W * DV;
        float *uk = cur_k + u * W * D, *uv = cur_v + u * W * DV, *uf = cur_f + u * W * F;
        const float *st = state + u * F * DV, *nrm = norm + u * F;
        for (int64_t g = 0; g < G; g++) {
            const int64_t head = h * G + g;
            const float *qv = q + (u * G + g) * D, *fqv = ufq + g * F;
            float *out = y + (u * G + g) * DV;
            float m = -INFINITY;
            for (int64_t j = 0; j < N; j++) {
                w[j] = scale * dot(qv, column(c, j, 0, sk, ck, pk, uk, k + u * D), D);
                if (w[j] > m) m = w[j];
            }
            const float bh = b[head];
            float den = bh * dot(fqv, nrm, F);
            for (int64_t e = 0; e < DV; e++) out[e] = 0.0f;
            for (int64_t j = 0; j < N; j++) {
                const float x = a[head] * expf(w[j] - m);
                den += x;
                axpy(out, x, column(c, j, 1, sv, cv, pv, uv, v + u * DV), DV);
            }
            for (int64_t f = 0; f < F; f++) axpy(out, bh * fqv[f], st + f * DV, DV); /* the linear state */
            const float inv = 1.0f / den;
            for (int64_t e = 0; e < DV; e++) out[e] *= inv;
        }
        /* the token joins the current block */
        memcpy(uk + r * D, k + u * D, (size_t)D * sizeof(float));
        memcpy(uv + r * DV, v + u * DV, (size_t)DV * sizeof(float));
        memcpy(uf + r * F, ufk, (size_t)F * sizeof(float));
        free(w);
    }
    return failed;
}

int zoo_sparse_hybrid_decode_f32(int64_t B, int64_t HKV, int64_t G, int64_t D, int64_t DV, int64_t F,
                                 int64_t W, int64_t S, int64_t C, int64_t open_sinks, int64_t cached,
                                 int64_t prev_on, int64_t r, const float *q, const float *fq,
                                 const float *k, const float *v, const float *fk, const float *a,
                                 const float *b, const float *sink_k, const float *sink_v,
                                 const float *cache_k, const float *cache_v, const float *prev_k,
                                 const float *prev_v, float *cur_k, float *cur_v, float *cur_f,
                                 const float *state, const float *norm, float scale, float *y,
                                 int threads) {
    const Columns c = {D, DV, F, W, S, C, open_sinks, cached, prev_on, r};
    const HedgehogMaps none = {NULL, NULL, 1.0f};
    return decode_units(&c, &none, B, HKV, G, q, fq, k, v, fk, a, b, sink_k, sink_v, cache_k, cache_v,
                        prev_k, prev_v, cur_k, cur_v, cur_f, state, norm, scale, y, threads);
}

int zoo_hedgehog_sparse_decode_f32(int64_t B, int64_t HKV, int64_t G, int64_t D, int64_t DV, int64_t F,
                                   int64_t W, int64_t S, int64_t C, int64_t open_sinks, int64_t cached,
                                   int64_t prev_on, int64_t r, const float *q, const float *Wq,
                                   const float *k, const float *v, const float *Wk, const float *a,
                                   const float *b, const float *sink_k, const float *sink_v,
                                   const float *cache_k, const float *cache_v, const float *prev_k,
                                   const float *prev_v, float *cur_k, float *cur_v, float *cur_f,
                                   const float *state, const float *norm, float scale, float *y,
                                   int threads, float fq_scale) {
    const Columns c = {D, DV, F, W, S, C, open_sinks, cached, prev_on, r};
    const HedgehogMaps maps = {Wq, Wk, fq_scale};
    return decode_units(&c, &maps, B, HKV, G, q, NULL, k, v, NULL, a, b, sink_k, sink_v, cache_k, cache_v,
                        prev_k, prev_v, cur_k, cur_v, cur_f, state, norm, scale, y, threads);
}
