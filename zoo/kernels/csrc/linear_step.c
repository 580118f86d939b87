/* One token a row of gated linear attention (zoo/kernels/linear_attention.py's recurrence), for decoding:

       S' = diag(g) S + k^T v        z' = g * z + k (normalize)        y = q S' (/ (q . z' + eps))

   with the state kept once per key/value head: the H query heads come in runs of `groups` that share a
   key/value head, its keys, values and gate (the first head of each run is read) and its state, as
   zoo.kernels.dispatch keeps it. q, k [B, H, Dk], v [B, H, Dv], gate: none (kind 0), a log gate per head
   [B, H] (kind 1) or per key dimension [B, H, Dk] (kind 2); S [B, H / groups, Dk, Dv] and z
   [B, H / groups, Dk] in (NULL: zeros) and out (new memory: the state handed in stays as it was); y
   [B, H, Dv]. fp32, contiguous. One pass over the state instead of PyTorch's dozen ops a token (the
   repeated state, the augmented values, the decay, the outer product, the read, the split and the
   regrouping, each a tensor of its own). OpenMP over rows x key/value heads where there is enough work. */

#include <stdint.h>

#include "vec.h"
#include "vmath.h"

void zoo_linear_step_f32(int64_t B, int64_t H, int64_t groups, int64_t Dk, int64_t Dv, const float *q,
                         const float *k, const float *v, const float *gate, int gate_kind, const float *S_in,
                         const float *z_in, int normalize, float eps, float *y, float *S_out, float *z_out,
                         int threads) {
    const int64_t Hkv = H / groups, units = B * Hkv;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && units * Dk * Dv >= 65536)
    for (int64_t unit = 0; unit < units; unit++) {
        const int64_t b = unit / Hkv, first = b * H + (unit % Hkv) * groups; /* the run's first head */
        const float *kt = k + first * Dk, *vt = v + first * Dv;
        const float *S0 = S_in ? S_in + unit * Dk * Dv : 0, *z0 = z_in ? z_in + unit * Dk : 0;
        float *S1 = S_out + unit * Dk * Dv, *z1 = normalize ? z_out + unit * Dk : 0;
        for (int64_t i = 0; i < Dk; i++) {
            const float g = gate_kind == 0 ? 1.0f : vexpf(gate_kind == 1 ? gate[first] : gate[first * Dk + i]);
            const float ki = kt[i];
            decay_axpy(S1 + i * Dv, S0 ? S0 + i * Dv : 0, g, ki, vt, Dv);
            if (normalize) z1[i] = (z0 ? g * z0[i] : 0.0f) + ki;
        }
        for (int64_t h = first; h < first + groups; h++) {
            const float *qh = q + h * Dk;
            float *yh = y + h * Dv;
#pragma omp simd
            for (int64_t j = 0; j < Dv; j++) yh[j] = 0.0f;
            for (int64_t i = 0; i < Dk; i++) axpy(yh, qh[i], S1 + i * Dv, Dv);
            if (normalize) {
                const float den = dot(qh, z1, Dk);
                const float inv = 1.0f / (den + eps);
#pragma omp simd
                for (int64_t j = 0; j < Dv; j++) yh[j] *= inv;
            }
        }
    }
}
