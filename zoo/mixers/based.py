"""`based` and `based-window`: Based's 2nd-order Taylor feature map on a learned low-dimensional
projection of q and k; `based-window` adds a sliding-window softmax in the same layer.

    phi(x) = [1, x / d^(1/4), (x (x) x) / (sqrt(2) sqrt(d))],   x = q W (per query head) or k W (per key/value
    head), W [D, d], d = feature_dim (16 as in Based)
    phi(q) . phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2d) >= 1/2   (exp(q.k / sqrt(d)) to 2nd order)

The outer product is stored once per unordered pair (the diagonal, then sqrt(2) x_i x_j for i < j), the
same dot product with F = 1 + d + d(d+1)/2 features (153 at d = 16) instead of 1 + d + d^2 (273).

Init of W (no random numbers): a truncated identity on the teacher's strongest rotary pairs, scaled by
(d/D)^(1/4). Llama-style RoPE rotates dims i and i + D/2 together, so W keeps d/2 whole pairs: q W . k W
is then exactly part of the teacher's q.k, with its relative-position behaviour intact (a plain
"first d dims" identity keeps only the highest-frequency, mostly positional, dims, each without its
partner). `init_from_teacher` picks, per key/value group, the pairs of largest ||W_q row||^2 ||W_k row||^2;
before that (or for a mixer built alone) the d/2 lowest-frequency pairs. The scale turns
q W . k W / sqrt(d) into that partial q.k / sqrt(D), the teacher's own temperature. Measured on
SmolLM2-135M (7 layers, 512 tokens), relative output MSE at the start: weight-norm pairs 1.05 alone /
0.96 with the window, first-d identity 1.05 / 0.99, small random 1.08 / 1.00 (all scaled); small
differences, as the Taylor map is broad anyway, but the pair init is the principled one and free.

`based-window`: the LoLCATs window hybrid (zoo.kernels.window_hybrid) with the Taylor features as the
linear branch: keys in the last `window` tokens get softmax weights a * exp(q.k/sqrt(D) - m), older keys
b * phi(q).phi(k), one shared normalizer, a = sigmoid(w) learned per head. Chosen over Based's separate
sum of two normalized outputs because one normalizer lets the split between recent and old keys follow
each query's actual weights, and the hybrid kernel (exact under splits, O(W) state, ablations by
`branch`) already exists. Taylor weights are >= 1/2 per key, so the window needs a larger share than
for Hedgehog's: window_factor a = 0.99 (a/b = 99) measured 0.62 against 0.96 at 0.5, 0.82 at 0.9 and
0.71 at 0.999.
"""

from __future__ import annotations

import torch

from zoo.mixers.base import register_mixer, repeat_kv
from zoo.mixers.feature_map import FeatureMapMixer
from zoo.mixers.features import HeadwiseLinear, num_taylor_features, taylor_features
from zoo.mixers.hybrid import WindowHybridMixer
from zoo.mixers.options import Option


def rope_pair_projection(pairs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """pairs [h, d/2] rotary indices (< D/2) -> W [h, D, d]: a truncated identity on dims i and i + D/2 of
    each pair, scaled by (d/D)^(1/4)."""
    h, half = pairs.shape
    dims = torch.cat([pairs, pairs + head_dim // 2], dim=-1)  # [h, d]
    w = torch.zeros(h, head_dim, 2 * half, device=pairs.device)
    w.scatter_(1, dims[:, None, :], 1.0)
    return w * (2 * half / head_dim) ** 0.25


class _TaylorMaps:
    """The Taylor feature map and its pair-selection init, shared by both mixers; expects feature_map_q
    [H, D, d] and feature_map_k [Hkv, D, d]."""

    def feature_map(self, h, is_query, tokens):
        return taylor_features((self.feature_map_q if is_query else self.feature_map_k)(h))

    def _check_dims(self) -> None:
        d, D = self.feature_dim, self.head_dim
        if d < 2 or d % 2 or d > D or D % 2:
            raise ValueError(
                f"mixer.options.feature_dim: {self.name} needs it even and in [2, head_dim] "
                f"with an even head_dim ({D}), got {d}"
            )

    def _set_pairs(self, pairs: torch.Tensor) -> None:
        """pairs [Hkv, d/2]: the rotary pairs each key/value group keeps (its query heads too)."""
        wk = rope_pair_projection(pairs, self.head_dim)
        with torch.no_grad():
            for m, w in (
                (self.feature_map_k, wk),
                (self.feature_map_q, repeat_kv(wk[None], self.num_heads)[0]),
            ):
                m.weight.copy_(w.to(m.weight.dtype))

    def _default_pairs(self) -> None:  # the d/2 lowest rotary frequencies
        half = self.head_dim // 2
        lowest = torch.arange(half - self.feature_dim // 2, half, device=self.feature_map_k.weight.device)
        self._set_pairs(lowest.expand(self.num_kv_heads, -1))

    def init_from_teacher(self, q_proj, k_proj, v_proj) -> None:
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        eq = q_proj.weight.detach().float().view(H, D, -1).pow(2).sum(-1).view(Hkv, H // Hkv, D).sum(1)
        ek = k_proj.weight.detach().float().view(Hkv, D, -1).pow(2).sum(-1)
        energy = eq * ek  # [Hkv, D]: how much each dim weighs in the group's q.k, by weight norms
        energy = energy[:, : D // 2] + energy[:, D // 2 :]
        self._set_pairs(energy.topk(self.feature_dim // 2, dim=-1).indices)


@register_mixer("based")
class BasedMixer(_TaylorMaps, FeatureMapMixer):
    state_size = "4*Hkv*(F*D + F) bytes (fp32), F = 1 + d + d(d+1)/2 (153 at d = feature_dim = 16)"
    description = "Based linear attention: 2nd-order Taylor feature map of a learned d-dim projection of q, k"
    source = (
        "Arora et al. 2024, Simple linear attention language models balance the recall-throughput "
        "tradeoff (Based, arXiv:2402.18668)"
    )
    options = {
        "feature_dim": Option(
            16, int, min=2, doc="projected dim d the Taylor map expands (even, <= head_dim)"
        ),
    }
    test_options = {"feature_dim": 4}

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options):
        super().__init__(num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options)
        self.feature_dim = int(self.config["feature_dim"])
        self._check_dims()
        self.num_features = num_taylor_features(self.feature_dim)
        self.feature_map_q = HeadwiseLinear(num_heads, head_dim, self.feature_dim)
        self.feature_map_k = HeadwiseLinear(num_kv_heads, head_dim, self.feature_dim)
        self._default_pairs()


@register_mixer("based-window")
class BasedWindowMixer(_TaylorMaps, WindowHybridMixer):
    family = "hybrid"
    state_size = (
        "Hkv*(F*D + F) fp32 + W*Hkv*(2D + F) (last W keys, values, phi(k)); F = 1 + d + d(d+1)/2, "
        "d = feature_dim (16)"
    )
    description = (
        "Based Taylor linear attention + sliding-window softmax (W tokens), one normalizer, learned mixing"
    )
    source = (
        "Arora et al. 2024, Based (arXiv:2402.18668); window hybrid as in LoLCATs (Zhang et al. 2024, "
        "arXiv:2410.10254)"
    )
    options = {
        "window": 64,
        "feature_dim": Option(
            16,
            int,
            min=2,
            nullable=True,
            doc="projected dim d the Taylor map expands (even, <= head_dim); null: head_dim",
        ),
        "window_factor": 0.99,
        "sinks": 0,
        "linear_mass_tokens": None,
        "linear_horizon": None,
    }
    test_options = {"window": 4, "feature_dim": 4}

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options):
        super().__init__(num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options)
        self._check_dims()
        self._default_pairs()
