/* One chunk's per-key gates folded into its queries and keys: the forward's fold of
   zoo/kernels/_linear_chunked.py for per-key gates with mild decay (`_fold`, kind "key", not strong).

   q, k, g [BH, T, Dk] (fp32, contiguous; g the raw log gate), the chunk the C tokens from t0. With b the
   in-chunk cumulative log gate (b_c = g_t0 + ... + g_{t0 + c}) and b_last its last row:

       read[i, c] = q[i, t0 + c] * e^{b_c},   attend[i, c] = k[i, t0 + c] * e^{-b_c},
       write[i, c] = attend[i, c] * e^{b_last},   decay[i] = e^{b_last}

   read, attend, write [BH, C, Dk] and decay [BH, Dk], contiguous; and where the backward asks for them (not
   NULL), the factors read_scale = e^{b_c}, attend_scale = e^{-b_c} and write_scale = e^{b_last - b_c}, the
   same shape. One pass instead of a cumulative sum along a strided axis, two exponentials, a negation and
   three products. OpenMP over BH. */

#include "vmath.h"

void zoo_fold_key_gates_f32(int64_t BH, int64_t T, int64_t C, int64_t Dk, int64_t t0, const float *q,
                            const float *k, const float *g, float *read, float *attend, float *write,
                            float *decay, float *read_scale, float *attend_scale, float *write_scale,
                            int threads) {
    const int scales = read_scale != NULL && attend_scale != NULL && write_scale != NULL;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t i = 0; i < BH; i++) {
        const int64_t in = (i * T + t0) * Dk, out = i * C * Dk;
        float *b = decay + i * Dk; /* the running cumulative log gate, then e^{b_last} */
        for (int64_t f = 0; f < Dk; f++) b[f] = 0.0f;
        for (int64_t c = 0; c < C; c++) {
            const float *qc = q + in + c * Dk, *kc = k + in + c * Dk, *gc = g + in + c * Dk;
            float *rc = read + out + c * Dk, *ac = attend + out + c * Dk;
#pragma omp simd
            for (int64_t f = 0; f < Dk; f++) {
                b[f] += gc[f];
                rc[f] = qc[f] * vexpf(b[f]);
                ac[f] = kc[f] * vexpf(-b[f]);
            }
            if (scales) {
                float *rs = read_scale + out + c * Dk, *as = attend_scale + out + c * Dk;
#pragma omp simd
                for (int64_t f = 0; f < Dk; f++) {
                    rs[f] = vexpf(b[f]);
                    as[f] = vexpf(-b[f]);
                }
            }
        }
#pragma omp simd
        for (int64_t f = 0; f < Dk; f++) b[f] = vexpf(b[f]);
        for (int64_t c = 0; c < C; c++) {
            const float *ac = attend + out + c * Dk;
            float *wc = write + out + c * Dk;
#pragma omp simd
            for (int64_t f = 0; f < Dk; f++) wc[f] = ac[f] * b[f];
            if (scales) {
                const float *as = attend_scale + out + c * Dk;
                float *ws = write_scale + out + c * Dk;
#pragma omp simd
                for (int64_t f = 0; f < Dk; f++) ws[f] = as[f] * b[f];
            }
        }
    }
}
