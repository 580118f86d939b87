"""Feature-map linear attention: y_t = phi(q_t) S_t / (phi(q_t) . z_t), S_t = sum_{s<=t} phi(k_s)^T v_s,
z_t = sum_{s<=t} phi(k_s). The base of `linear-elu`, `t2r`, `hedgehog` (and the linear half of hybrids).

A subclass defines only the feature map `feature_map(x, is_query)` and its parameters. The map for keys
runs per key/value head (before the heads are repeated for grouped-query attention), the map for
queries per query head. The state is the kernel's (S, z), fp32, kept once per key/value head
(S [B, Hkv, F, D], z [B, Hkv, F]): a query group shares its keys and values, hence its state.
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.kernels.dispatch import linear_attention
from zoo.kernels.linear_attention import LinearAttentionState
from zoo.mixers.base import Mixer, repeat_kv


class HeadwiseLinear(nn.Module):
    """x [B, h, T, D] -> x @ W_h (+ b_h): one [D, F] map per head, computed in fp32.

    init "identity": W_h = I (rectangular when F != D). "signed": column f is +-e_(f mod D), the sign
    flipping every D columns, so that relu features start as relu(x), relu(-x), ... and none is dead.
    Given more heads than it holds (a query map tied to a key map under GQA), each map serves its group.
    """

    def __init__(self, heads: int, in_dim: int, out_dim: int, bias: bool = False, init: str = "identity"):
        super().__init__()
        f = torch.arange(out_dim)
        w = torch.zeros(in_dim, out_dim)
        if init == "identity":
            n = min(in_dim, out_dim)
            w[:n, :n] = torch.eye(n)
        elif init == "signed":
            w[f % in_dim, f] = 1.0 - 2.0 * ((f // in_dim) % 2)
        else:
            raise ValueError(f"unknown init {init!r}")
        self.weight = nn.Parameter(w.expand(heads, in_dim, out_dim).clone())
        self.bias = nn.Parameter(torch.zeros(heads, 1, out_dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.float(), None if self.bias is None else self.bias.float()
        if x.shape[1] != w.shape[0]:
            w = w.repeat_interleave(x.shape[1] // w.shape[0], dim=0)
            b = None if b is None else b.repeat_interleave(x.shape[1] // b.shape[0], dim=0)
        y = x.float() @ w
        return y if b is None else y + b


class FeatureMapMixer(Mixer):
    """Causal, normalized linear attention with a feature map phi. Not registered itself."""

    family = "linear"
    #: added to the normalizer phi(q) . z
    eps: float = 1e-6

    def feature_map(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        """x [B, h, T, D] (h = num_heads for queries, num_kv_heads for keys) -> phi(x) [B, h, T, F],
        non-negative, fp32."""
        raise NotImplementedError

    # --- helpers for learned per-head maps: separate query and key maps unless options tie them ---

    def _make_maps(self, make) -> None:
        """make(heads) -> a module mapping [B, heads, T, D]. With tie_qk the query map is the key map
        (per key/value head, serving each query group)."""
        self.k_map = make(self.num_kv_heads)
        self.q_map = None if self.config.get("tie_qk") else make(self.num_heads)

    def _map(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        return (self.q_map if is_query and self.q_map is not None else self.k_map)(x)

    # --- the mixer ---

    def features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """phi(q) [B, H, T, F] and phi(k) repeated to the query heads [B, H, T, F], fp32."""
        fq = self.feature_map(q.float(), is_query=True)
        fk = repeat_kv(self.feature_map(k.float(), is_query=False), self.num_heads)
        return fq, fk

    def forward(self, q, k, v, x, state: LinearAttentionState | None = None, mask: torch.Tensor | None = None):
        fq, fk = self.features(q, k)
        v = repeat_kv(v, self.num_heads)
        if mask is not None:  # padded tokens add nothing: zero their keys and values
            if mask.shape != q.shape[:1] + q.shape[2:3]:
                raise ValueError(f"mask must be [B, T] = {tuple(q.shape[:1] + q.shape[2:3])}, got {tuple(mask.shape)}")
            pad = (mask == 0)[:, None, :, None]
            fk, v = fk.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
        return linear_attention(fq, fk, v, state=state, normalize=True, eps=self.eps,
                                kv_groups=self.kv_group_size)  # phi(k), v: one per KV head

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """phi(q_i) . phi(k_j) / sum_{j'<=i} phi(q_i) . phi(k_j'), j <= i: [B, H, T, T] fp32; the
        weights the forward applies (weights @ repeat_kv(v) == y)."""
        fq, fk = self.features(q, k)
        T = q.shape[2]
        a = (fq @ fk.transpose(-1, -2)).masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), 0.0)
        return a / (a.sum(-1, keepdim=True) + self.eps)
