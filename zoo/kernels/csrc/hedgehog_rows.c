/* Hedgehog's features of many rows of projections at once: out[N, 2F] = [softmax(h), softmax(-h)] for
   h [N, F], fp32, contiguous. It computes what zoo/mixers/features.py's `hedgehog_features` computes (the
   prefill's form: one pass over h, written once, instead of a negation, two softmaxes and a
   concatenation, each a pass over memory), with `threads` OpenMP threads over the rows. */

#include "hedgehog.h"

void zoo_hedgehog_rows_f32(int64_t N, int64_t F, const float *h, float *out, int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t i = 0; i < N; i++) hedgehog_softmaxes(h + i * F, F, 1.0f, out + i * 2 * F);
}
