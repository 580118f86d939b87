/* A per-feature log gate made from a low-rank projection of the layer input, as `gla` makes it:

       log g[b, n, t, f] = logsigmoid(x_low[b, t] . W[n * F + f] + bias[n * F + f]) * scale

   x_low [B, T, R] (the input already projected down to rank R), Wt [R, H * F] (the up projection's weight,
   transposed), bias [H * F]; out [B, H, T, F], the heads' layout the chunked kernels take, fp32, contiguous.
   One pass that writes the gate once, instead of a matmul, a log sigmoid (which also writes a buffer), a
   division and a transposing copy, each a pass over H * F values per token. OpenMP over the tokens; each
   thread holds one token's H * F logits. Both entries return 1 where that row could not be allocated. */

#include <stdlib.h>

#include "vmath.h"

/* logits[HF] = bias + x[R] Wt for one token */
static void token_logits(const float *x, int64_t R, int64_t HF, const float *Wt, const float *bias,
                         float *logits) {
#pragma omp simd
    for (int64_t j = 0; j < HF; j++) logits[j] = bias[j];
    for (int64_t r = 0; r < R; r++) {
        const float xr = x[r];
        const float *w = Wt + r * HF;
#pragma omp simd
        for (int64_t j = 0; j < HF; j++) logits[j] += xr * w[j];
    }
}

/* log g for token t of row b: out[b, n, t, :] for every head n */
static void gate_forward(const float *logits, int64_t b, int64_t t, int64_t T, int64_t H, int64_t F, float scale,
                         const void *unused, float *out) {
    (void)unused;
    for (int64_t n = 0; n < H; n++) {
        float *o = out + ((b * H + n) * T + t) * F;
        const float *l = logits + n * F;
#pragma omp simd
        for (int64_t f = 0; f < F; f++) o[f] = vlogsigmoidf(l[f]) * scale;
    }
}

/* the backward to the logits for token t of row b: dlogits[b, t, :] from dout[b, :, t, :] */
static void gate_backward(const float *logits, int64_t b, int64_t t, int64_t T, int64_t H, int64_t F,
                          float scale, const void *dout_, float *dlogits) {
    const float *dout = dout_;
    for (int64_t n = 0; n < H; n++) {
        const float *d = dout + ((b * H + n) * T + t) * F;
        const float *l = logits + n * F;
        float *o = dlogits + (b * T + t) * H * F + n * F;
#pragma omp simd
        for (int64_t f = 0; f < F; f++) {
            const float e = vexpf(l[f] < 0.0f ? l[f] : -l[f]);                /* e^-|x| */
            const float down = l[f] < 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e); /* sigmoid(-x) */
            o[f] = d[f] * scale * down;
        }
    }
}

typedef void (*PerToken)(const float *, int64_t, int64_t, int64_t, int64_t, int64_t, float, const void *,
                         float *);

static int over_tokens(PerToken each, int64_t B, int64_t T, int64_t R, int64_t H, int64_t F, const float *x_low,
                       const float *Wt, const float *bias, float scale, const void *extra, float *out,
                       int threads) {
    const int64_t HF = H * F;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        float *logits = malloc(sizeof(float) * HF);
        if (logits == NULL) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t bt = 0; bt < B * T; bt++) {
                token_logits(x_low + bt * R, R, HF, Wt, bias, logits);
                each(logits, bt / T, bt % T, T, H, F, scale, extra, out);
            }
            free(logits);
        }
    }
    return failed;
}

int zoo_low_rank_log_gate_f32(int64_t B, int64_t T, int64_t R, int64_t H, int64_t F, const float *x_low,
                              const float *Wt, const float *bias, float scale, float *out, int threads) {
    return over_tokens(gate_forward, B, T, R, H, F, x_low, Wt, bias, scale, NULL, out, threads);
}

/* Its backward to the logits: dlogits[b, t, n * F + f] = dout[b, n, t, f] * scale * sigmoid(-logit), the
   logits recomputed as above. dout [B, H, T, F]; dlogits [B, T, H * F] (the layout whose products with
   x_low and W give their gradients). */
int zoo_low_rank_log_gate_backward_f32(int64_t B, int64_t T, int64_t R, int64_t H, int64_t F,
                                       const float *x_low, const float *Wt, const float *bias, float scale,
                                       const float *dout, float *dlogits, int threads) {
    return over_tokens(gate_backward, B, T, R, H, F, x_low, Wt, bias, scale, dout, dlogits, threads);
}
