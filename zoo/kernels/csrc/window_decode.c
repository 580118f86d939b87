/* The window hybrid's decoding step, fused: one new token per row, fp32, every row at one position.

   It computes what zoo/kernels/window_decode.py's PyTorch form computes (its docstring has the formula
   and why it is exact) in one call, so a layer's step is one loop nest instead of some 40 tensor
   operations. Shapes (all contiguous, row-major; HKV key/value heads, G query heads per group, H = HKV*G):

     q [B, HKV, G, D], fq [B, HKV, G, F]           the new token's queries and query features
     k [B, HKV, D], v [B, HKV, DV], fk [B, HKV, F]  its key, value and key features
     a, b [H]; c [H] or NULL                        per-head weights of the softmax and linear columns
     sink_k [B, HKV, S, D], sink_v [B, HKV, S, DV] (NULL when S = 0)
     win_k [B, HKV, cap, D], win_v [B, HKV, cap, DV], win_f [B, HKV, cap, F]: slot buffers of cap > L
       slots a key/value head, the window's L slots (right-aligned) first
     state [B, HKV, F, DV], norm [B, HKV, F]: the linear state of keys that left the window
     shut [S + L + 1]: columns (sinks, slots, new token) that are not softmax keys of the query
     lin [L + 1]: slots and new token that are its linear keys (the same masks for every row)

   Outputs: y [B, HKV, G, DV]; the new token's k, v, fk written into slot L of the buffers (the next
   window is slots 1 to L: nothing is copied); new_state = state + win_f[0] outer win_v[0], new_norm =
   norm + win_f[0]. Returns 0, or 1 when the scratch space could not be had.

   zoo_hedgehog_window_decode_f32 takes, instead of fq and fk, the Hedgehog maps Wq [HKV * G, D, F / 2]
   and Wk [HKV, D, F / 2] and computes the features itself (hedgehog.h), the queries' scaled by
   fq_scale: the layer's whole step, features included, in one call. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "hedgehog.h"
#include "vec.h"

typedef struct {
    int64_t G, D, DV, F, L, S;
    const uint8_t *shut, *lin;
    const float *a, *b, *c; /* per query head; c may be NULL */
    float scale;
} Shape;

/* G query heads of one key/value head, the first of them query head `head0` (q, fq and y at it): their
   outputs y[G][DV], and where nst is not NULL the key/value head's next state. The G queries are scored
   together, so each key, value and state row is read once for them. w is scratch for G * (S + L + 1)
   column weights. */
static void one_group(const Shape *s, int64_t head0, int64_t G, const float *q, const float *fq,
                      const float *k,
                      const float *v, const float *fk, const float *sk, const float *sv, const float *wk,
                      const float *wv, const float *wf, const float *st, const float *nrm, float *w,
                      float *y, float *nst, float *nnrm) {
    const int64_t S = s->S, L = s->L, N = S + L + 1, D = s->D, DV = s->DV, F = s->F;
    const float *a = s->a + head0, *b = s->b + head0, *c = s->c ? s->c + head0 : NULL;
    float m[G], den[G];
    for (int64_t g = 0; g < G; g++) m[g] = -INFINITY;
    for (int64_t j = 0; j < N; j++) { /* softmax scores: sinks, slots, the new token */
        if (s->shut[j]) {
            for (int64_t g = 0; g < G; g++) w[g * N + j] = -INFINITY;
            continue;
        }
        const float *key = j < S ? sk + j * D : (j < S + L ? wk + (j - S) * D : k);
        for (int64_t g = 0; g < G; g++) {
            const float x = s->scale * dot(q + g * D, key, D);
            w[g * N + j] = x;
            if (x > m[g]) m[g] = x;
        }
    }
    for (int64_t g = 0; g < G; g++) {
        float *wg = w + g * N;
        const float ag = a[g], mg = m[g];
#pragma omp simd
        for (int64_t j = 0; j < N; j++) wg[j] = s->shut[j] ? 0.0f : ag * vexpf(wg[j] - mg);
    }
    for (int64_t i = 0; i <= L; i++) { /* linear weights of the slots and the new token */
        const int on = s->lin[i], extra = c != NULL && !s->shut[S + i];
        if (!on && !extra) continue;
        const float *fkey = i < L ? wf + i * F : fk;
        for (int64_t g = 0; g < G; g++)
            w[g * N + S + i] += ((on ? b[g] : 0.0f) + (extra ? c[g] : 0.0f)) * dot(fq + g * F, fkey, F);
    }
    for (int64_t g = 0; g < G; g++) {
        den[g] = 0.0f;
        for (int64_t e = 0; e < DV; e++) y[g * DV + e] = 0.0f;
    }
    for (int64_t j = 0; j < N; j++) { /* the columns' values */
        const float *val = j < S ? sv + j * DV : (j < S + L ? wv + (j - S) * DV : v);
        for (int64_t g = 0; g < G; g++) {
            const float x = w[g * N + j];
            if (x == 0.0f) continue;
            den[g] += x;
            axpy(y + g * DV, x, val, DV);
        }
    }
    /* one pass over the linear state: read by the queries, then the oldest slot leaves the window for it */
    for (int64_t f = 0; f < F; f++) {
        const float *row = st + f * DV;
        for (int64_t g = 0; g < G; g++) {
            const float x = b[g] * fq[g * F + f];
            den[g] += x * nrm[f];
            axpy(y + g * DV, x, row, DV);
        }
        if (nst == NULL) continue;
        float *out = nst + f * DV;
        const float x = wf[f];
#pragma omp simd
        for (int64_t e = 0; e < DV; e++) out[e] = row[e] + x * wv[e];
        nnrm[f] = nrm[f] + x;
    }
    for (int64_t g = 0; g < G; g++) {
        const float inv = 1.0f / den[g];
        for (int64_t e = 0; e < DV; e++) y[g * DV + e] *= inv;
    }
}

static int decode_units(const Shape *s, const HedgehogMaps *maps, int64_t B, int64_t HKV,
                        int64_t cap, const float *q, const float *fq, const float *k, const float *v,
                        const float *fk,
                        const float *sink_k, const float *sink_v, float *win_k, float *win_v,
                        float *win_f, const float *state, const float *norm, float *y, float *new_state,
                        float *new_norm, int threads) {
    const int64_t G = s->G, D = s->D, DV = s->DV, F = s->F, L = s->L, S = s->S, N = S + L + 1;
    const int64_t units = B * HKV, scratch = G * N + G * F + F;
    const int64_t P = item_parts(units, G, threads), items = units * P; /* decode_items.h */
    int failed = 0;
#pragma omp parallel for num_threads(threads) if (threads > 1 && items > 1) reduction(| : failed)
    for (int64_t item = 0; item < items; item++) {
        float *w = (float *)malloc((size_t)scratch * sizeof(float));
        if (w == NULL) {
            failed = 1;
            continue;
        }
        const WorkItem it = work_item(item, P, G);
        const int64_t u = it.u;
        const float *pfq, *ufk;
        /* every item needs the token's key features too: it is a column of every query */
        item_features(maps, &it, HKV, G, 1, D, F, q, k, fq, fk, w + G * N, &pfq, &ufk);
        float *wk = win_k + u * cap * D, *wv = win_v + u * cap * DV, *wf = win_f + u * cap * F;
        /* the first part writes the unit's next state and its token */
        one_group(s, (u % HKV) * G + it.g0, it.Gs, q + it.first * D, pfq, k + u * D, v + u * DV, ufk,
                  S ? sink_k + u * S * D : NULL, S ? sink_v + u * S * DV : NULL, wk, wv, wf,
                  state + u * F * DV, norm + u * F, w, y + it.first * DV,
                  it.part == 0 ? new_state + u * F * DV : NULL, new_norm + u * F);
        /* the new token enters after the window's slots, in the buffer's room */
        if (it.part == 0) write_token(wk, wv, wf, L, k + u * D, v + u * DV, ufk, D, DV, F);
        free(w);
    }
    return failed;
}

int zoo_window_hybrid_decode_f32(int64_t B, int64_t HKV, int64_t G, int64_t D, int64_t DV, int64_t F,
                                 int64_t L, int64_t S, int64_t cap, const float *q, const float *fq,
                                 const float *k, const float *v, const float *fk, const float *a,
                                 const float *b, const float *c, const float *sink_k, const float *sink_v,
                                 float *win_k, float *win_v, float *win_f, const float *state,
                                 const float *norm, const uint8_t *shut, const uint8_t *lin, float scale,
                                 float *y, float *new_state, float *new_norm, int threads) {
    const Shape s = {G, D, DV, F, L, S, shut, lin, a, b, c, scale};
    const HedgehogMaps none = {NULL, NULL, 1.0f};
    return decode_units(&s, &none, B, HKV, cap, q, fq, k, v, fk, sink_k, sink_v, win_k, win_v, win_f,
                        state, norm, y, new_state, new_norm, threads);
}

int zoo_hedgehog_window_decode_f32(int64_t B, int64_t HKV, int64_t G, int64_t D, int64_t DV, int64_t F,
                                   int64_t L, int64_t S, int64_t cap, const float *q, const float *Wq,
                                   const float *k, const float *v, const float *Wk, const float *a,
                                   const float *b, const float *c, const float *sink_k,
                                   const float *sink_v, float *win_k, float *win_v, float *win_f,
                                   const float *state, const float *norm, const uint8_t *shut,
                                   const uint8_t *lin, float scale, float *y, float *new_state,
                                   float *new_norm, int threads, float fq_scale) {
    const Shape s = {G, D, DV, F, L, S, shut, lin, a, b, c, scale};
    const HedgehogMaps maps = {Wq, Wk, fq_scale};
    return decode_units(&s, &maps, B, HKV, cap, q, NULL, k, v, NULL, sink_k, sink_v, win_k, win_v,
                        win_f, state, norm, y, new_state, new_norm, threads);
}
