"""Feature-map linear attention: y_t = phi(q_t) S_t / (phi(q_t) . z_t), S_t = sum_{s<=t} phi(k_s)^T v_s,
z_t = sum_{s<=t} phi(k_s). The base of `linear-elu`, `t2r`, `hedgehog`, `based`.

`FeatureMapped` is the hook every mixer built on a feature map shares (this base, the gated base in
zoo.mixers.gated, the window hybrid in zoo.mixers.hybrid): a subclass defines only
`feature_map(h, is_query, tokens)` and its parameters. The map for keys runs per key/value head (before
the heads are repeated for grouped-query attention), the map for queries per query head; `tokens`
(zoo.mixers.tokens.Tokens) gives the layer input x, the mask and the positions.

The state of `FeatureMapMixer` is the kernel's (S, z), fp32, kept once per key/value head (S [B, Hkv, F,
D], z [B, Hkv, F]): a query group shares its keys and values, hence its state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from zoo.kernels.dispatch import linear_attention
from zoo.mixers.base import Mixer, repeat_kv
from zoo.mixers.tokens import Tokens


class FeatureMapped(Mixer):
    """A mixer built on a feature map phi: the `feature_map` hook and `features`. Not registered itself."""

    def feature_map(self, h: torch.Tensor, is_query: bool, tokens: Tokens) -> torch.Tensor:
        """h [B, n, T, D] (q with n = num_heads, or k with n = num_kv_heads, fp32) -> phi(h) [B, n, T, F],
        non-negative, fp32."""
        raise NotImplementedError

    def features(
        self, q: torch.Tensor, k: torch.Tensor, tokens: Tokens, per_kv_head: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """phi(q) [B, H, T, F] and phi(k) repeated to the query heads [B, H, T, F] (per_kv_head: once per
        key/value head, [B, Hkv, T, F]), fp32."""
        fq = self.feature_map(q.float(), True, tokens)
        fk = self.feature_map(k.float(), False, tokens)
        return fq, (fk if per_kv_head else repeat_kv(fk, self.num_heads))

    # --- helpers for learned per-head maps: separate query and key maps unless options tie them ---

    def make_maps(self, make: Callable[[int], nn.Module]) -> None:
        """make(heads) -> a module mapping [B, heads, T, D]. With the option tie_qk the query map is the key
        map (per key/value head, serving each query group)."""
        self.k_map = make(self.num_kv_heads)
        self.q_map = None if self.config.get("tie_qk") else make(self.num_heads)

    def map_for(self, is_query: bool) -> nn.Module:
        """The query map (or the key map, for keys or when tied)."""
        return self.q_map if is_query and self.q_map is not None else self.k_map

    def map_of(self, h: torch.Tensor, is_query: bool) -> torch.Tensor:
        """h through the query map (or the key map, for keys or when tied)."""
        return self.map_for(is_query)(h)


class FeatureMapMixer(FeatureMapped):
    """Causal, normalized linear attention with a feature map phi. Not registered itself."""

    family = "linear"
    #: added to the normalizer phi(q) . z
    eps: float = 1e-6

    def forward(self, q, k, v, x, state=None, mask=None):
        tokens, state = self.tokens_and_state(q, x, state, mask)
        fq, fk = self.features(q, k, tokens)
        fk, v = tokens.zero_padding(fk, repeat_kv(v, self.num_heads))  # padded tokens add nothing
        y, state = linear_attention(
            fq, fk, v, state=state, normalize=True, eps=self.eps, kv_groups=self.kv_group_size
        )  # phi(k), v: one per KV head
        return y, self.carry(tokens, state)

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """phi(q_i) . phi(k_j) / sum_{j'<=i} phi(q_i) . phi(k_j'), j <= i: [B, H, T, T] fp32; the
        weights the forward applies (weights @ repeat_kv(v) == y)."""
        fq, fk = self.features(q, k, Tokens.whole(q))
        T = q.shape[2]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        a = (fq @ fk.transpose(-1, -2)).masked_fill(~causal, 0.0)
        return a / (a.sum(-1, keepdim=True) + self.eps)
