"""LoLA: `lolcats-terraced-sink` with a sparse global cache of the keys its linear state recalls worst.

The layer of `lolcats-terraced-sink` (Hedgehog feature maps, a terraced window of 64-token blocks, 4 attention
sinks, the linear branch's mass capped at 64 keys) plus a cache of up to `cache_size` older key/value pairs
that stay exact softmax keys. When a block leaves the window, its keys and the cache's compete: each is scored
by how badly the linear state would give back its value when asked with its key (self-recall error), the
worst-recalled `cache_size` stay, the rest go into the linear state. A pass key, unlike the filler around it,
is what a linear state recalls worst, so the cache is where it survives. zoo.kernels.sparse_cache has the
exact formula and the eviction rule; LoLA (arXiv:2505.23666) adds the cache to a trained LoLCATs model
without training, which is how zoo's `eval` overrides can use it too (`mixer.name=lola` on a
`lolcats-terraced-sink` run reads the same weights).

Ablations (`mixer.branch`): "window" is softmax alone over the window, the sinks and the cache (a = 1, b = 0);
"linear" is the linear branch alone over every key, as in zoo.mixers.hybrid (no cache: it returns that
module's state). No attention weights for stage 1's cross-entropy: the cache is chosen token by token.
"""

from __future__ import annotations

import torch

from zoo.kernels.sparse_cache import SparseHybridState, decode_in_c, held_keys, sparse_hybrid
from zoo.mixers.base import register_mixer
from zoo.mixers.hybrid import HedgehogWindowHybrid
from zoo.mixers.options import Option
from zoo.mixers.tokens import Tokens


@register_mixer("lola")
class Lola(HedgehogWindowHybrid):
    """Hedgehog linear attention + terraced window + 4 sinks + a sparse cache of the worst-recalled keys."""

    source = "LoLA (McDermott et al. 2025, arXiv:2505.23666); LoLCATs (arXiv:2410.10254)"
    description = (
        "lolcats-terraced-sink + a sparse cache: the 192 older keys its linear state recalls worst stay exact"
    )
    state_size = (
        "Hkv*(2F*D + 2F) fp32 + (C + 2W)*Hkv*(2D + 2F) (cache and two blocks: keys, values, phi(k)) + "
        "S*Hkv*2D (sinks); F = feature_dim (default D), S = sinks (4), C = cache_size (192)"
    )
    options = {
        **HedgehogWindowHybrid.options,
        "sinks": 4,
        "linear_mass_tokens": 64,
        "cache_size": Option(
            192, int, min=0, doc="older keys kept exactly: those the linear state recalls worst; 0: none"
        ),
        "recall_error": Option(
            "absolute",
            str,
            choices=("absolute", "relative"),
            doc="how the cache scores a key: ||v - recalled v||^2 (LoLA) or that over ||v||^2",
        ),
    }
    test_options = {"window": 4, "feature_dim": 8, "sinks": 2, "cache_size": 3, "linear_mass_tokens": 6}
    terraced = True

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options):
        super().__init__(num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options)
        self.cache_size = int(self.config["cache_size"])

    def linear_keys(self, positions: torch.Tensor | int) -> torch.Tensor | int:
        """The keys in the linear state at each query position (or one, an int): those out of the window,
        not sinks and not in the cache (zoo.kernels.sparse_cache.held_keys)."""
        if self.branch == "linear":
            return super().linear_keys(positions)
        return held_keys(positions, self.window, self.sinks, self.cache_size)[1]

    def _decode_with_cache_in_one_call(self, q, k, v, state, mask):
        """A decoding step with the sparse cache (one token per row, no padding, no gradient), features and
        all as one C call (zoo.kernels.sparse_cache.decode_in_c), or None: the general path then runs."""
        fused = self._next_token_in_c(q, k, v, state, mask)
        if fused is not None:
            return fused
        maps = self._decoding_maps(q, k, v, state, mask, SparseHybridState)
        if maps is None:
            return None
        a, b, _ = self.factors()
        relative = self.config["recall_error"] == "relative"
        return decode_in_c(
            q, k, v, None, None, a, b, state, self.head_dim**-0.5, maps=maps, relative=relative
        )

    def forward(self, q, k, v, x, state=None, mask=None):
        if self.branch == "linear":
            return super().forward(q, k, v, x, state, mask)
        fused = self._decode_with_cache_in_one_call(q, k, v, state, mask)
        if fused is not None:
            return fused
        seen = torch.zeros(q.shape[0], dtype=torch.long, device=q.device) if state is None else state.n
        tokens = Tokens.of(q, x, mask, seen)
        fq, fk = self.features(q, k, tokens, per_kv_head=True)
        a, b, _ = self.factors()
        return sparse_hybrid(
            q,
            k,
            v,
            fq,
            fk,
            a,
            b,
            window=self.window,
            sinks=self.sinks,
            cache_size=self.cache_size,
            scale=self.head_dim**-0.5,
            state=state,
            key_mask=tokens.mask,
            relative=self.config["recall_error"] == "relative",
        )

    def attention_weights(self, q, k):
        return None
