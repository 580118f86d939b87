/* One token a row of the (gated) delta rule (zoo/kernels/delta_rule.py), for decoding:

       S' = g S + k^T u,   u = beta (v - g k S),   y = q S'

   per row and head: q, k [B, H, Dk], v [B, H, Dv], beta [B, H], the log gate [B, H] (NULL: g = 1), S
   [B, H, Dk, Dv] in (NULL: zeros) and out (new memory: the state handed in stays as it was), y [B, H, Dv];
   fp32, contiguous. Two passes over the state (k S, then the write) and a read of the new one from cache,
   instead of PyTorch's decay, product, difference, outer product, sum and read, each a tensor of its own.
   OpenMP over rows x heads where there is enough work. Returns 1 where scratch could not be allocated. */

#include <stdint.h>
#include <stdlib.h>

#include "vec.h"
#include "vmath.h"

int zoo_delta_step_f32(int64_t B, int64_t H, int64_t Dk, int64_t Dv, const float *q, const float *k,
                       const float *v, const float *beta, const float *log_gate, const float *S_in, float *y,
                       float *S_out, int threads) {
    const int64_t units = B * H;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1 && units * Dk * Dv >= 65536)
    {
        float *u = malloc(sizeof(float) * (size_t)Dv);
        if (!u) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t unit = 0; unit < units; unit++) {
            if (!u) continue;
            const float g = log_gate ? vexpf(log_gate[unit]) : 1.0f, b = beta[unit];
            const float *kt = k + unit * Dk, *vt = v + unit * Dv, *qt = q + unit * Dk;
            const float *S0 = S_in ? S_in + unit * Dk * Dv : 0;
            float *S1 = S_out + unit * Dk * Dv, *yt = y + unit * Dv;
#pragma omp simd
            for (int64_t j = 0; j < Dv; j++) u[j] = 0.0f;
            if (S0)
                for (int64_t i = 0; i < Dk; i++) axpy(u, kt[i], S0 + i * Dv, Dv);
#pragma omp simd
            for (int64_t j = 0; j < Dv; j++) {
                u[j] = b * (vt[j] - g * u[j]);
                yt[j] = 0.0f;
            }
            for (int64_t i = 0; i < Dk; i++) {
                float *row = S1 + i * Dv;
                decay_axpy(row, S0 ? S0 + i * Dv : 0, g, kt[i], u, Dv);
                axpy(yt, qt[i], row, Dv);
            }
        }
        free(u);
    }
    return failed;
}
