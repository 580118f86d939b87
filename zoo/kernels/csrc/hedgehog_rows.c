/* Hedgehog's features of many rows of projections at once: out[N, 2F] = [softmax(h), softmax(-h)] for
   h [N, F], fp32, contiguous. It computes what zoo/mixers/features.py's `hedgehog_features` computes (the
   prefill's form: one pass over h, written once, instead of a negation, two softmaxes and a
   concatenation, each a pass over memory), with `threads` OpenMP threads over the rows. */

#include "hedgehog.h"

void zoo_hedgehog_rows_f32(int64_t N, int64_t F, const float *h, float *out, int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t i = 0; i < N; i++) hedgehog_softmaxes(h + i * F, F, 1.0f, out + i * 2 * F);
}

/* Its backward: dh[N, F] from the features out[N, 2F] = [p, n] and their gradient dout[N, 2F] = [gp, gn]:
   dh = p * (gp - p . gp) - n * (gn - n . gn) (the softmax's backward, the second with the sign of -h). */
void zoo_hedgehog_rows_backward_f32(int64_t N, int64_t F, const float *out, const float *dout, float *dh,
                                    int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *p = out + i * 2 * F, *n = p + F, *gp = dout + i * 2 * F, *gn = gp + F;
        float *d = dh + i * F;
        float sp = 0.0f, sn = 0.0f;
#pragma omp simd reduction(+ : sp, sn)
        for (int64_t f = 0; f < F; f++) {
            sp += p[f] * gp[f];
            sn += n[f] * gn[f];
        }
#pragma omp simd
        for (int64_t f = 0; f < F; f++) d[f] = p[f] * (gp[f] - sp) - n[f] * (gn[f] - sn);
    }
}
