"""LoLCATs: Hedgehog linear attention and sliding-window softmax in one layer, with learned mixing.

For query t (see zoo.kernels.window_hybrid for the exact formula), keys inside the window get softmax
weights a * exp(q.k/sqrt(D) - m_t), older keys get linear weights b * phi_q(q).phi_k(k), with one shared
normalizer. a = sigmoid(w) and b = 1 - a are learned per head; phi_q and phi_k are Hedgehog feature maps
phi(x) = [softmax(x W), softmax(-x W)] (over features), W [D, F] per head initialized to the identity.

Two registered variants: `lolcats` (plain sliding window of `window` tokens) and `lolcats-terraced`
(blocks of `window` tokens: softmax over the previous block and causally within the current one, the
ThunderKittens-friendly "terraced" window). Option `sinks` (default 0): the first `sinks` tokens are
softmax keys of every query (attention sinks, see zoo.kernels.window_hybrid); `lolcats-sink` and
`lolcats-terraced-sink` are the two with 4 sinks (StreamingLLM's count), an O(1) addition to the state.

Init of the window factor (option `window_factor`, the initial a, default 0.5, i.e. w = 0). Only the ratio
a/b matters (the normalizer divides out any common scale). The window branch is max-normalized, so its
top key weighs a, while each linear key starts at b * phi_q.phi_k ~ b * 2/F at the identity init. At
a = b the window therefore dominates the recent context, and the linear branch takes over only as the
out-of-window history grows to hundreds of tokens, which matches the locality of a teacher's attention
without starving the linear branch of gradient; w = 0 is also where sigmoid learns fastest. The LoLCATs
code starts from a = sigmoid(-2.197) = 0.1 with b = 1 (ratio 0.1); `window_factor=0.1` gives ratio 0.11.

`hedgehog-sink`: the same layer without a window (`window=0`, 4 sinks): Hedgehog linear attention over
every key but the first four, which are softmax keys of every query. No window: its state is the linear
state and the 4 sinks, constant in the context.

Ablations: set `mixer.branch` at eval time (default "both"):
- "window": sliding-window softmax alone (a = 1, b = 0).
- "linear": Hedgehog linear attention alone over ALL past keys, window and sinks included (a = 0, b = c = 1,
  computed without sinks, which are never linear keys in the hybrid).
The state is built the same way in the "both" and "window" branches, so splitting and carrying stay exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from zoo.kernels.dispatch import window_hybrid
from zoo.kernels.window_hybrid import window_hybrid_weights
from zoo.mixers.base import Mixer, register_mixer, repeat_kv
from zoo.mixers.feature_map import HeadwiseLinear
from zoo.mixers.hedgehog import hedgehog_features
from zoo.mixers.options import Option


class LolcatsBase(Mixer):
    """The LoLCATs window hybrid with Hedgehog feature maps; registered through its subclasses."""

    family = "hybrid"
    source = "LoLCATs (Zhang et al. 2024, arXiv:2410.10254); Hedgehog (Zhang et al. 2024, arXiv:2402.04347)"
    options = {
        "window": Option(64, int, min=0, doc="softmax window in tokens (block size when terraced); 0: none, "
                                              "allowed with sinks >= 1 on a plain window"),
        "feature_dim": Option(None, int, min=1, nullable=True,
                              doc="Hedgehog projections per head (2x as many features); null: head_dim"),
        "window_factor": Option(0.5, float, above=0, below=1,
                                doc="initial window share a of every head (the linear branch gets 1 - a)"),
        "sinks": Option(0, int, min=0,
                        doc="first tokens kept as softmax keys of every query (attention sinks)"),
    }
    terraced = False
    BRANCHES = ("both", "window", "linear")

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options):
        super().__init__(num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options)
        self.window = int(self.config["window"])
        self.feature_dim = int(self.config["feature_dim"] or head_dim)
        self.sinks = int(self.config["sinks"])
        a0 = float(self.config["window_factor"])
        if self.window == 0 and (self.sinks < 1 or self.terraced):
            raise ValueError(f"{self.name}: need window >= 1 (or 0 with sinks >= 1, plain window); "
                             f"got window=0, sinks={self.sinks}")
        # the same Hedgehog maps as the `hedgehog` mixer: queries per head, keys per key/value head
        self.feature_map_q = HeadwiseLinear(num_heads, head_dim, self.feature_dim)
        self.feature_map_k = HeadwiseLinear(num_kv_heads, head_dim, self.feature_dim)
        self.window_logit = nn.Parameter(torch.full((num_heads,), math.log(a0 / (1.0 - a0))))
        self.branch = "both"

    def factors(self):
        """(a, b, c) per head for the kernel, following `self.branch`."""
        if self.branch not in self.BRANCHES:
            raise ValueError(f"branch must be one of {self.BRANCHES}, got {self.branch!r}")
        a = torch.sigmoid(self.window_logit.float())
        if self.branch == "window":
            return torch.ones_like(a), torch.zeros_like(a), None
        if self.branch == "linear":
            return torch.zeros_like(a), torch.ones_like(a), torch.ones_like(a)
        return a, 1.0 - a, None

    def _window_and_sinks(self) -> tuple[int, int]:
        # the linear branch alone is linear attention over all keys: the sinks are not taken out of it, and
        # the window does not matter (a = 0, b = c = 1 gives every key its linear weight)
        if self.branch == "linear":
            return max(self.window, 1), 0
        return self.window, self.sinks

    def _features(self, q, k):
        fq = hedgehog_features(self.feature_map_q(q))
        fk = repeat_kv(hedgehog_features(self.feature_map_k(k)), self.num_heads)
        return repeat_kv(k, self.num_heads), fq, fk

    def forward(self, q, k, v, x, state=None, mask=None):
        k, fq, fk = self._features(q, k)
        v = repeat_kv(v, self.num_heads)
        if mask is not None:
            keep = mask.to(q.device).bool()[:, None, :, None]
            k, v, fk = k * keep, v * keep, fk * keep
        a, b, c = self.factors()
        window, sinks = self._window_and_sinks()
        return window_hybrid(q, k, v, fq, fk, a, b, c=c, window=window, terraced=self.terraced,
                             scale=self.head_dim ** -0.5, state=state, key_mask=mask, sinks=sinks,
                             kv_groups=self.kv_group_size)  # k, v, fk: one per KV head

    def attention_weights(self, q, k):
        k, fq, fk = self._features(q, k)
        a, b, c = self.factors()
        window, sinks = self._window_and_sinks()
        return window_hybrid_weights(q, k, fq, fk, a, b, c=c, window=window, terraced=self.terraced,
                                     scale=self.head_dim ** -0.5, sinks=sinks)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, branch={self.branch!r}"


@register_mixer("lolcats")
class Lolcats(LolcatsBase):
    """Hedgehog linear attention + plain sliding-window softmax (last `window` tokens), learned mixing."""

    description = "Hedgehog linear attention + sliding-window softmax (W tokens), learned per-head mixing"
    state_size = "Hkv*(2F*D + 2F) fp32 + W*Hkv*(2D + 2F) (last W keys, values, phi(k)); F = feature_dim (default D)"
    terraced = False


@register_mixer("lolcats-terraced")
class LolcatsTerraced(LolcatsBase):
    """Hedgehog linear attention + terraced window: softmax over the previous and current `window`-token
    block (causal within the current one), learned mixing."""

    description = "Hedgehog linear attention + terraced block window softmax (64-token blocks), learned mixing"
    state_size = "Hkv*(2F*D + 2F) fp32 + 2W*Hkv*(2D + 2F) (last 2W keys, values, phi(k)); F = feature_dim (default D)"
    terraced = True


@register_mixer("lolcats-sink")
class LolcatsSink(Lolcats):
    """`lolcats` + 4 attention sinks: the first tokens stay softmax keys of every query."""

    description = "lolcats + 4 attention sinks (the first tokens: softmax keys of every query)"
    options = {**Lolcats.options, "sinks": 4}
    state_size = ("Hkv*(2F*D + 2F) fp32 + W*Hkv*(2D + 2F) (last W keys, values, phi(k)) + S*Hkv*2D (first S keys, "
                  "values); F = feature_dim (default D), S = sinks (4)")


@register_mixer("lolcats-terraced-sink")
class LolcatsTerracedSink(LolcatsTerraced):
    """`lolcats-terraced` + 4 attention sinks."""

    description = "lolcats-terraced + 4 attention sinks (the first tokens: softmax keys of every query)"
    options = {**LolcatsTerraced.options, "sinks": 4}
    state_size = ("Hkv*(2F*D + 2F) fp32 + 2W*Hkv*(2D + 2F) (last 2W keys, values, phi(k)) + S*Hkv*2D (first S "
                  "keys, values); F = feature_dim (default D), S = sinks (4)")


@register_mixer("hedgehog-sink")
class HedgehogSink(Lolcats):
    """Hedgehog linear attention over every key but the first 4, which are softmax keys of every query: no
    window (`lolcats` with window=0 and 4 sinks)."""

    family = "linear"
    description = "Hedgehog linear attention + 4 attention sinks (softmax over the first 4 tokens), no window"
    options = {**Lolcats.options, "window": 0, "sinks": 4}
    state_size = "Hkv*(2F*D + 2F) fp32 + S*Hkv*2D (first S keys, values); F = feature_dim (default D), S = sinks (4)"
