"""`delta` (DeltaNet) and `gated-delta` (Gated DeltaNet): the delta rule as a token mixer (the base:
zoo.mixers.delta_base).

    S_t = g_t (S_{t-1} - beta_t k_t (k_t^T S_{t-1})) + beta_t k_t v_t^T        y_t = q_t S_t

(zoo.kernels.delta_rule; g_t = 1 for `delta`). Instead of adding k_t v_t^T to the memory, each step
replaces a fraction beta_t of what the memory returns for k_t by v_t, so old associations are
overwritten rather than summed up: no normalizer, and a state that stays bounded (k is L2-normalized,
so I - beta k k^T is a contraction).

Parameterization (what stage 1 trains), chosen for attention transfer from a softmax teacher:
- Feature maps: q and k (RoPE applied) go through a learned per-head map phi(x) = L2norm(act(x W)),
  W [D, F] per head (queries per query head, keys per key/value head) starting as the identity
  (the "signed" +-identity when F > D), act = SiLU by default as in DeltaNet. The read q.S then
  starts from the teacher's own q.k geometry (a cosine of the same projections) rather than from
  random features, and W is free to sharpen or rotate it. Measured on SmolLM2-135M layers 1, 15, 29
  (T = 256, 40 steps at lr 1e-2, MSE after o_proj relative to the teacher output's mean square):
  identity 0.090/0.167/0.100, silu 0.084/0.149/0.091, relu 0.082/0.147/0.090, hedgehog features
  0.097/0.178/0.128, the `hedgehog` mixer itself 0.098/0.194/0.190; after 120 steps (layers 8, 22)
  identity, silu and relu tie. SiLU starts nearer the teacher than the identity (initial MSE about
  0.8 vs 1.0), has no dead half unlike ReLU, and is DeltaNet's choice: the default. The L2 norm is
  not optional: with |k| = 1 the write I - beta k k^T is a contraction, so the state stays bounded
  with no normalizer. A learned per-head scale on q was tried and changed nothing (gated-delta,
  layer 15: 0.141 vs 0.140), so there is none.
- beta_t = sigmoid(x W_beta + b) per query head, from the layer input x: a new [hidden, H] linear,
  W_beta starting at 0 and b at logit(beta_init), so every head starts with the same write strength
  and learns which tokens to write. Data-dependent beta matters: with W_beta frozen at 0 the MSE
  rises from 0.140 to 0.196 (gated-delta, layer 15).
- `gated-delta` adds log g_t = -exp(A_log) * softplus(x W_a + dt_bias) (Mamba2 / Gated DeltaNet), W_a
  at 0, A_log at 0 and softplus(dt_bias) log-uniform in [dt_min, dt_max] over the heads: every head
  starts near no decay (g in [exp(-dt_max), exp(-dt_min)] = [0.905, 0.999] by default), spread over
  time scales. The gate helps (layers 15, 22: 0.141/0.241 vs 0.149/0.275 for `delta`); the range
  [1e-3, 1e-1] did as well as [1e-2, 1] and better than [1e-4, 1e-2] (0.143/0.257).
Padding (mask 0): beta = 0 and log g = 0 there, so padded tokens neither write nor decay anything.
GQA: keys and values are repeated to the query heads; beta, the gate and the state are per query head.
"""

from __future__ import annotations

from zoo.mixers.base import register_mixer
from zoo.mixers.delta_base import DeltaRuleMixer, GatedDeltaRuleMixer


@register_mixer("delta")
class DeltaMixer(DeltaRuleMixer):
    description = "DeltaNet: delta-rule memory (overwrite, not add), learned L2-normed feature maps"
    state_size = "4*H*F*D bytes (fp32 S), F = feature_dim (default D; 2F with feature_map=hedgehog)"


@register_mixer("gated-delta")
class GatedDeltaMixer(GatedDeltaRuleMixer):
    description = "Gated DeltaNet: delta rule + data-dependent scalar decay per head (Mamba2-style gate)"
    state_size = "4*H*F*D bytes (fp32 S), F = feature_dim (default D; 2F with feature_map=hedgehog)"
    source = (
        "Yang, Kautz, Hatamizadeh 2024, Gated Delta Networks: Improving Mamba2 with Delta Rule "
        "(arXiv:2412.06464); DeltaNet (arXiv:2406.06484)"
    )
