"""`sliding-window`: the teacher's own softmax attention over its last `window` tokens and the first `sinks`
tokens (StreamingLLM, Xiao et al. 2023), with nothing to train.

It is the free baseline of long context: a linearized model exists to beat it past the window, and the
share of the gap between it and full attention that a mixer closes is zoo's headline long-range figure
(zoo.long_context). Computed by the window hybrid kernel with the window share a = 1 and the linear share
b = 0, so it is the `window` branch of every hybrid with the teacher's own queries and keys. Its state is
the last `window` keys and values plus the `sinks` first ones: constant in the context.
"""

from __future__ import annotations

import torch

from zoo.kernels.dispatch import window_hybrid
from zoo.mixers.base import Mixer, register_mixer
from zoo.mixers.options import Option
from zoo.mixers.tokens import Tokens


@register_mixer("sliding-window")
class SlidingWindowMixer(Mixer):
    family = "window"
    state_size = "2*Hkv*D*(window + sinks) floats (constant)"
    description = (
        "The teacher's softmax over its last `window` tokens and first `sinks` tokens (StreamingLLM); "
        "no training: the free baseline of long context"
    )
    source = "StreamingLLM (Xiao et al. 2023, arXiv:2309.17453)"
    options = {
        "window": Option(64, int, min=0, doc="softmax window in tokens; 0: the sinks alone"),
        "sinks": Option(4, int, min=0, doc="first tokens kept as softmax keys of every query"),
    }
    test_options = {"window": 4, "sinks": 2}

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options):
        super().__init__(num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options)
        self.window = int(self.config["window"])
        self.sinks = int(self.config["sinks"])
        if self.window == 0 and self.sinks == 0:
            raise ValueError("sliding-window: window and sinks are both 0, so no key is left to attend to")

    def forward(self, q, k, v, x, state=None, mask=None):
        seen = torch.zeros(q.shape[0], dtype=torch.long, device=q.device) if state is None else state.n
        tokens = Tokens.of(q, x, mask, seen)
        k, v = tokens.zero_padding(k, v)  # one per key/value head: the kernels repeat them if needed
        no_features = q.new_zeros(*q.shape[:-1], 1)  # b = 0: the linear part is empty
        share = torch.ones(self.num_heads, device=q.device)
        return window_hybrid(
            q,
            k,
            v,
            no_features,
            no_features[:, : k.shape[1]],
            share,
            torch.zeros_like(share),
            window=self.window,
            scale=self.head_dim**-0.5,
            state=state,
            key_mask=tokens.mask,
            sinks=self.sinks,
            kv_groups=self.kv_group_size,
        )
