"""`softmax`: the teacher's own causal attention, with a KV cache as its state (the reference)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zoo.kernels.softmax import causal_softmax_attention
from zoo.mixers.base import Mixer, register_mixer
from zoo.mixers.tokens import real_tokens


@dataclass
class KVState:
    """All keys/values so far: k, v [B, Hkv, S, D]; mask [B, S] (1 real, 0 padding)."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor


@register_mixer("softmax")
class SoftmaxMixer(Mixer):
    family = "softmax"
    state_size = "2*Hkv*D*T floats (grows with the context T)"
    description = (
        "Exact causal softmax attention with a KV cache: linearizing with it reproduces the teacher."
    )
    source = "Vaswani et al. 2017 (the teacher itself)"
    options = {}

    def forward(self, q, k, v, x, state=None, mask=None):
        B, _, T, _ = q.shape
        mask = real_tokens(mask, q)
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=q.device)
        if state is not None:
            k = torch.cat([state.k, k], dim=2)
            v = torch.cat([state.v, v], dim=2)
            mask = torch.cat([state.mask, mask], dim=1)
        key_mask = None if bool(mask.all()) else mask
        y = causal_softmax_attention(q, k, v, key_mask=key_mask, scale=self.head_dim**-0.5)
        return y, KVState(k, v, mask)
