/* LoLA's decoding step (zoo/kernels/sparse_cache.py), fused: one token per row, fp32, every row at one
   position n (past its sinks). Where the token ends its block, the caller does the eviction after it.

   The query's softmax keys are the open sinks, the cache's used entries, the previous block (once there is
   one) and the current block's first r = n mod W tokens, then the token itself; the linear keys are in
   S, z (which only the eviction changes):

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

#include "hedgehog.h"
#include "vec.h"

typedef struct {
    int64_t D, DV, F, W, S, C, open_sinks, cached, prev_on, r;
} Columns;

/* The softmax columns of one unit in order, as runs of rows: the open sinks, the cache's used entries, the
   previous block (once there is one), the current block's first r tokens, the token. Fills base[5] and
   count[5] with the runs' first rows (of keys, or of values) and their lengths. */
static void column_runs(const Columns *c, const float *sink, const float *cache, const float *prev,
                        const float *cur, const float *token, const float **base, int64_t *count) {
    base[0] = sink, count[0] = c->open_sinks;
    base[1] = cache, count[1] = c->cached;
    base[2] = prev, count[2] = c->prev_on ? c->W : 0;
    base[3] = cur, count[3] = c->r;
    base[4] = token, count[4] = 1;
}

/* G query heads of one unit (a, b, q, fq and y at the first of them): y[G][DV]. Each key and value row is
   read once for them; w is scratch for G * N column weights. */
static void one_group(const Columns *c, const float *q, const float *fq, const float *a, const float *b,
                      const float *const *keys, const float *const *vals, const int64_t *count, int64_t N,
                      const float *st, const float *nrm, float scale, float *w, float *y, int64_t G) {
    const int64_t D = c->D, DV = c->DV, F = c->F;
    float den[G];
    for (int64_t run = 0, j = 0; run < 5; run++) /* scores */
        for (int64_t i = 0; i < count[run]; i++, j++) {
            const float *key = keys[run] + i * D;
            for (int64_t g = 0; g < G; g++) w[g * N + j] = scale * dot(q + g * D, key, D);
        }
    for (int64_t g = 0; g < G; g++) { /* softmax weights, times a */
        float *wg = w + g * N, m = -INFINITY, sum = 0.0f;
        for (int64_t j = 0; j < N; j++) m = wg[j] > m ? wg[j] : m;
        const float ag = a[g];
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < N; j++) {
            wg[j] = ag * vexpf(wg[j] - m);
            sum += wg[j];
        }
        den[g] = sum + b[g] * dot(fq + g * F, nrm, F);
        for (int64_t e = 0; e < DV; e++) y[g * DV + e] = 0.0f;
    }
    for (int64_t run = 0, j = 0; run < 5; run++) /* the columns' values */
        for (int64_t i = 0; i < count[run]; i++, j++) {
            const float *val = vals[run] + i * DV;
            for (int64_t g = 0; g < G; g++) axpy(y + g * DV, w[g * N + j], val, DV);
        }
    for (int64_t f = 0; f < F; f++) /* the linear state */
        for (int64_t g = 0; g < G; g++) axpy(y + g * DV, b[g] * fq[g * F + f], st + f * DV, DV);
    for (int64_t g = 0; g < G; g++) {
        const float inv = 1.0f / den[g];
        for (int64_t e = 0; e < DV; e++) y[g * DV + e] *= inv;
    }
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
    const int64_t P = item_parts(units, G, threads), items = units * P; /* decode_items.h */
    const int64_t scratch = G * N + G * F + F;
    int failed = 0;
#pragma omp parallel for num_threads(threads) if (threads > 1 && items > 1) reduction(| : failed)
    for (int64_t item = 0; item < items; item++) {
        float *w = (float *)malloc((size_t)scratch * sizeof(float));
        if (w == NULL) {
            failed = 1;
            continue;
        }
        const WorkItem it = work_item(item, P, G);
        const int64_t u = it.u, h = u % HKV;
        const float *pfq, *ufk;
        item_features(maps, &it, HKV, G, it.part == 0, D, F, q, k, fq, fk, w + G * N, &pfq, &ufk);
        float *uk = cur_k + u * W * D, *uv = cur_v + u * W * DV, *uf = cur_f + u * W * F;
        const float *keys[5], *vals[5];
        int64_t count[5];
        column_runs(c, sink_k + u * S * D, cache_k + u * C * D, prev_k + u * W * D, uk, k + u * D, keys,
                    count);
        column_runs(c, sink_v + u * S * DV, cache_v + u * C * DV, prev_v + u * W * DV, uv, v + u * DV,
                    vals, count);
        one_group(c, q + it.first * D, pfq, a + h * G + it.g0, b + h * G + it.g0, keys, vals, count, N,
                  state + u * F * DV, norm + u * F, scale, w, y + it.first * DV, it.Gs);
        /* the token joins the current block (slot r: no item reads it) */
        if (it.part == 0) write_token(uk, uv, uf, r, k + u * D, v + u * DV, ufk, D, DV, F);
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
