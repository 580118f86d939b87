"""`delta` (DeltaNet) and `gated-delta` (Gated DeltaNet): the delta rule as a token mixer.

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

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels.dispatch import delta_rule
from zoo.mixers.base import Mixer, decay_bias, register_mixer, repeat_kv
from zoo.mixers.feature_map import HeadwiseLinear
from zoo.mixers.options import Option

_ACTIVATIONS = {
    "identity": lambda h: h,
    "silu": F.silu,
    "relu": torch.relu,
    "hedgehog": lambda h: torch.cat([torch.softmax(h, dim=-1), torch.softmax(-h, dim=-1)], dim=-1),
}


class _DeltaBase(Mixer):
    """The delta rule with learned feature maps and write strength; subclasses add a gate.

    A head may hold several memories (`memories`, 1 here): each its own feature maps, write strength
    and gate over the head's q, k, v, stacked memory-major along the head axis of the kernel's rows
    (memory m of head h is row m * H + h), so one delta-rule call runs them all."""

    family = "delta"
    source = ("Yang et al. 2024, Parallelizing Linear Transformers with the Delta Rule over Sequence Length "
              "(DeltaNet, arXiv:2406.06484)")
    options = {
        "feature_dim": Option(None, int, min=1, nullable=True,
                              doc="F, the projections per head; null: head_dim"),
        "feature_map": Option("silu", str, choices=tuple(_ACTIVATIONS),
                              doc="act in phi = L2norm(act(x W)); hedgehog gives 2F features"),
        "beta_init": Option(0.5, float, above=0, below=1, doc="the write strength every head starts with"),
    }
    #: memories per head (rows of the kernel per query head)
    memories: int = 1

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options):
        super().__init__(num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options)
        self.feature_dim = int(self.config["feature_dim"] or head_dim)
        b0 = float(self.config["beta_init"])
        self.act = _ACTIVATIONS[self.config["feature_map"]]
        M = self.memories
        self.q_map = HeadwiseLinear(M * num_heads, head_dim, self.feature_dim, init="signed")
        self.k_map = HeadwiseLinear(M * num_kv_heads, head_dim, self.feature_dim, init="signed")
        self.beta_proj = nn.Linear(hidden_size, M * num_heads)
        nn.init.zeros_(self.beta_proj.weight)
        nn.init.constant_(self.beta_proj.bias, math.log(b0 / (1.0 - b0)))

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """[B, h, T, D] -> [B, M * h, T, D]: the same heads once per memory."""
        return t if self.memories == 1 else t.repeat(1, self.memories, 1, 1)

    def _to_query_rows(self, t: torch.Tensor) -> torch.Tensor:
        """[B, M * Hkv, T, X] -> [B, M * H, T, X]: each memory's key/value heads repeated to its query heads."""
        B, _, T, X = t.shape
        t = t.reshape(B * self.memories, self.num_kv_heads, T, X)
        return repeat_kv(t, self.num_heads).reshape(B, self.memories * self.num_heads, T, X)

    def features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """phi(q) [B, M*H, T, F'] and phi(k) repeated to the query heads, fp32, both of unit norm."""
        fq = F.normalize(self.act(self.q_map(self._rows(q))), dim=-1)
        fk = F.normalize(self.act(self.k_map(self._rows(k))), dim=-1)
        return fq, self._to_query_rows(fk)

    def _linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] -> [B, rows, T], in fp32."""
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x.float(), layer.weight.float(), bias).transpose(1, 2)

    def log_gate(self, x: torch.Tensor) -> torch.Tensor | None:
        """log g [B, M*H, T] (<= 0), or None for no decay."""
        return None

    def recur(self, q, k, v, x, state=None, mask=None):
        """The delta rule over every memory: y [B, M*H, T, D] and the state S [B, M*H, F', D]."""
        fq, fk = self.features(q, k)
        v = self._rows(repeat_kv(v, self.num_heads))
        beta = torch.sigmoid(self._linear(self.beta_proj, x))
        log_gate = self.log_gate(x)
        if mask is not None:  # padded tokens neither write (beta = 0) nor decay (log g = 0)
            if mask.shape != q.shape[:1] + q.shape[2:3]:
                raise ValueError(f"mask must be [B, T] = {(q.shape[0], q.shape[2])}, got {tuple(mask.shape)}")
            keep = mask.to(q.device).bool()[:, None, :]
            beta = beta * keep
            log_gate = None if log_gate is None else log_gate * keep
            fk, v = fk * keep[..., None], v * keep[..., None]  # pads' k, v stay finite whatever they were
        return delta_rule(fq, fk, v, beta, log_gate, state=state)

    def forward(self, q, k, v, x, state=None, mask=None):
        return self.recur(q, k, v, x, state, mask)


@register_mixer("delta")
class DeltaMixer(_DeltaBase):
    description = "DeltaNet: delta-rule memory (overwrite, not add), learned L2-normed feature maps"
    state_size = "4*H*F*D bytes (fp32 S), F = feature_dim (default D; 2F with feature_map=hedgehog)"


@register_mixer("gated-delta")
class GatedDeltaMixer(_DeltaBase):
    description = "Gated DeltaNet: delta rule + data-dependent scalar decay per head (Mamba2-style gate)"
    state_size = "4*H*F*D bytes (fp32 S), F = feature_dim (default D; 2F with feature_map=hedgehog)"
    source = ("Yang, Kautz, Hatamizadeh 2024, Gated Delta Networks: Improving Mamba2 with Delta Rule "
              "(arXiv:2412.06464); DeltaNet (arXiv:2406.06484)")
    options = {
        **_DeltaBase.options,
        "dt_min": Option(1e-3, float, above=0,
                         doc="initial per-step decay rate -log g of head 0 (log-uniform to dt_max)"),
        "dt_max": Option(1e-1, float, above=0, doc="initial per-step decay rate -log g of the last head"),
    }

    def decay_ranges(self) -> list[tuple[float, float]]:
        """(dt_min, dt_max) of each memory: the range its heads' initial decay rates -log g span."""
        return [(float(self.config["dt_min"]), float(self.config["dt_max"]))]

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options):
        super().__init__(num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options)
        ranges = self.decay_ranges()
        if not all(0.0 < lo <= hi for lo, hi in ranges):
            raise ValueError(f"{self.name}: need 0 < dt_min <= dt_max in every decay range, got {ranges}")
        rows = self.memories * num_heads
        self.a_proj = nn.Linear(hidden_size, rows, bias=False)
        nn.init.zeros_(self.a_proj.weight)
        self.dt_bias = nn.Parameter(torch.cat([decay_bias(lo, hi, num_heads) for lo, hi in ranges]))
        self.A_log = nn.Parameter(torch.zeros(rows))

    def log_gate(self, x):
        dt = F.softplus(self._linear(self.a_proj, x) + self.dt_bias.float()[:, None])
        return -self.A_log.float().exp()[:, None] * dt
