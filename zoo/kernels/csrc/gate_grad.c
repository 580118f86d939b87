/* The gradient of per-key log gates in the chunked linear attention's backward (zoo/kernels/_linear_chunked.py,
   `_gate_grad`, kind "key"), in one pass:

       dG[i, t] = q[i, t] * dq[i, t] - k[i, t] * dk[i, t]  (+ last[i] at t = T - 1)
       out[i, t] = dG[i, t] + dG[i, t + 1] + ... + dG[i, T - 1]

   q, dq, k, dk, out [BH, T, Dk] and last [BH, Dk], fp32, contiguous. It replaces two products, a
   difference, two flips and a cumulative sum along a strided axis, each a pass over BH * T * Dk values.
   OpenMP over BH. */

#include <stdint.h>

void zoo_key_gate_grad_f32(int64_t BH, int64_t T, int64_t Dk, const float *q, const float *dq, const float *k,
                           const float *dk, const float *last, float *out, int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t i = 0; i < BH; i++) {
        float *acc = out + (i * T + T - 1) * Dk; /* the last step's sum starts the running one */
        const int64_t at = (i * T + T - 1) * Dk;
#pragma omp simd
        for (int64_t f = 0; f < Dk; f++) acc[f] = last[i * Dk + f] + q[at + f] * dq[at + f] - k[at + f] * dk[at + f];
        for (int64_t t = T - 2; t >= 0; t--) {
            const int64_t row = (i * T + t) * Dk;
            const float *next = out + row + Dk;
            float *o = out + row;
#pragma omp simd
            for (int64_t f = 0; f < Dk; f++) o[f] = next[f] + q[row + f] * dq[row + f] - k[row + f] * dk[row + f];
        }
    }
}
