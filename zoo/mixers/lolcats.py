"""LoLCATs: Hedgehog linear attention and sliding-window softmax in one layer, with learned mixing.

The window hybrid of zoo.mixers.hybrid with Hedgehog feature maps. For query t (see
zoo.kernels.window_hybrid for the exact formula), keys inside the window get softmax
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

Ablations (`mixer.branch`: "both", "window", "linear") and the state: see zoo.mixers.hybrid.
"""

from __future__ import annotations

from zoo.mixers.base import register_mixer
from zoo.mixers.hybrid import HedgehogWindowHybrid


class LolcatsBase(HedgehogWindowHybrid):
    """The LoLCATs window hybrid with Hedgehog feature maps; registered through its subclasses."""


@register_mixer("lolcats")
class Lolcats(LolcatsBase):
    """Hedgehog linear attention + plain sliding-window softmax (last `window` tokens), learned mixing."""

    description = "Hedgehog linear attention + sliding-window softmax (W tokens), learned per-head mixing"
    state_size = (
        "Hkv*(2F*D + 2F) fp32 + W*Hkv*(2D + 2F) (last W keys, values, phi(k)); F = feature_dim (default D)"
    )
    terraced = False


@register_mixer("lolcats-terraced")
class LolcatsTerraced(LolcatsBase):
    """Hedgehog linear attention + terraced window: softmax over the previous and current `window`-token
    block (causal within the current one), learned mixing."""

    description = (
        "Hedgehog linear attention + terraced block window softmax (64-token blocks), learned mixing"
    )
    state_size = (
        "Hkv*(2F*D + 2F) fp32 + 2W*Hkv*(2D + 2F) (last 2W keys, values, phi(k)); F = feature_dim (default D)"
    )
    terraced = True


@register_mixer("lolcats-sink")
class LolcatsSink(Lolcats):
    """`lolcats` + 4 attention sinks: the first tokens stay softmax keys of every query."""

    description = "lolcats + 4 attention sinks (the first tokens: softmax keys of every query)"
    options = {**Lolcats.options, "sinks": 4}
    state_size = (
        "Hkv*(2F*D + 2F) fp32 + W*Hkv*(2D + 2F) (last W keys, values, phi(k)) + S*Hkv*2D (first S keys, "
        "values); F = feature_dim (default D), S = sinks (4)"
    )


@register_mixer("lolcats-terraced-sink")
class LolcatsTerracedSink(LolcatsTerraced):
    """`lolcats-terraced` + 4 attention sinks."""

    description = "lolcats-terraced + 4 attention sinks (the first tokens: softmax keys of every query)"
    options = {**LolcatsTerraced.options, "sinks": 4}
    state_size = (
        "Hkv*(2F*D + 2F) fp32 + 2W*Hkv*(2D + 2F) (last 2W keys, values, phi(k)) + S*Hkv*2D (first S "
        "keys, values); F = feature_dim (default D), S = sinks (4)"
    )


@register_mixer("hedgehog-sink")
class HedgehogSink(Lolcats):
    """Hedgehog linear attention over every key but the first 4, which are softmax keys of every query: no
    window (`lolcats` with window=0 and 4 sinks)."""

    family = "linear"
    description = "Hedgehog linear attention + 4 attention sinks (softmax over the first 4 tokens), no window"
    options = {**Lolcats.options, "window": 0, "sinks": 4}
    test_options = {"feature_dim": 8}  # no window to shorten
    state_size = (
        "Hkv*(2F*D + 2F) fp32 + S*Hkv*2D (first S keys, values); F = feature_dim (default D), S = sinks (4)"
    )
