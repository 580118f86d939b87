"""`gated-delta-conv`: Gated DeltaNet with the layer's short convolutions and output gate, a fast memory
beside the slow one in every head, and the first token kept exact. No softmax, no window.

Per head, with q, k, v the teacher's (RoPE applied) and x the layer input:

    q', k', v' = conv(q), conv(k), conv(v)          short causal depthwise convs (conv_size taps; start:
    identity)
    y_m = GatedDelta_m(q', k', v')                  memory m: its own feature maps, write strength and gate
    u = (sum_m w_m y_m) * 2 sigmoid(x W_g) + conv_o(v')
    y = (1 - s) u + s v_1,  s = sigmoid(x W_s)     v_1: the value of the sequence's first real token
    y = v_1 at that first token itself

`gated-delta` (zoo.mixers.delta) is the recurrence alone. At the start: a slow memory (decay rates -log g
from 1e-3 to 1e-1 over the heads) and a fast one (5e-2 to 5e-1) weigh 1/2 each, conv_o is 0, the gate 1
and the share s sigmoid(-3) = 0.05. State: the memories S [B, M*H, F', D] fp32, the convs' last
conv_size-1 real inputs (q, k, v and the output conv's v'), the first token's value per key/value head and
the count of real tokens seen; padding skips all of it.

Experiments: docs/experiments.md
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from zoo.kernels.short_conv import causal_conv
from zoo.mixers.base import register_mixer, repeat_kv
from zoo.mixers.delta_base import GatedDeltaRuleMixer
from zoo.mixers.options import Option
from zoo.mixers.tokens import Tokens


class GatedDeltaConvState(NamedTuple):
    S: torch.Tensor  # [B, M*H, F', D] fp32: memory m of head h is row m * H + h
    conv_q: torch.Tensor  # [B, H, K-1, D]: the last real inputs of each conv (zeros before any)
    conv_k: torch.Tensor  # [B, Hkv, K-1, D]
    conv_v: torch.Tensor  # [B, Hkv, K-1, D]
    conv_o: torch.Tensor  # [B, Hkv, K-1, D]: the output conv's inputs, v' (the same for a query group)
    sink_v: torch.Tensor  # [B, Hkv, D] fp32: the first real token's value (zeros before it)
    seen: torch.Tensor  # [B] int64: real tokens so far


#: one end of a `decays` pair (0 < dt_min <= dt_max is checked with the others, by GatedDeltaRuleMixer)
DECAY_RATE = Option(1e-3, float, doc="a per-step decay rate -log g")


def _identity_taps(heads: int, dim: int, taps: int) -> torch.Tensor:
    """[heads, dim, taps] conv weights that pass the current token through (the last tap 1)."""
    w = torch.zeros(heads, dim, taps)
    w[..., -1] = 1.0
    return w


@register_mixer("gated-delta-conv")
class GatedDeltaConvMixer(GatedDeltaRuleMixer):
    description = (
        "Gated DeltaNet layer: short convs on q/k/v, a slow and a fast memory per head, output gate "
        "and conv, a share of the first token's value; no window, no softmax"
    )
    state_size = (
        "4*M*H*F*D bytes (fp32 S; M memories, F = feature_dim) + 4*(conv_size-1)*(H+3*Hkv)*D (conv "
        "inputs) + 4*Hkv*D (first value) + 8"
    )
    source = (
        "Yang, Kautz, Hatamizadeh 2024, Gated Delta Networks (arXiv:2412.06464): short convs, output "
        "gate; the fast memory is zoo's"
    )
    options = {
        **{k: v for k, v in GatedDeltaRuleMixer.options.items() if k not in ("dt_min", "dt_max")},
        "feature_dim": 128,
        "decays": Option(
            [[1e-3, 1e-1], [5e-2, 5e-1]],
            list,
            doc="one memory per [dt_min, dt_max] pair: its heads' initial decay rates -log g",
        ),
        "conv_size": Option(8, int, min=1, doc="taps of the short convs (1: each token alone, no mixing)"),
    }
    test_options = {"feature_dim": 8, "decays": [[0.05, 0.5], [0.2, 1.0]], "conv_size": 3}

    #: logit of the share of the first token's value every head starts with (sigmoid(-3) = 0.05)
    SINK_SHARE_LOGIT = -3.0

    @property
    def memories(self) -> int:
        return len(self.decay_ranges())

    def decay_ranges(self) -> list[tuple[float, float]]:
        decays = self.config["decays"]
        pairs = isinstance(decays, (list, tuple)) and all(
            isinstance(r, (list, tuple)) and len(r) == 2 for r in decays
        )
        key = "mixer.options.decays"
        if not decays or not pairs:
            raise ValueError(f"{key}: must be a non-empty list of [dt_min, dt_max] pairs, got {decays!r}")
        return [
            (DECAY_RATE.check(lo, f"{key}[{i}][0]"), DECAY_RATE.check(hi, f"{key}[{i}][1]"))
            for i, (lo, hi) in enumerate(decays)
        ]

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options):
        super().__init__(num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options)
        K = self.conv_size = int(self.config["conv_size"])
        self.conv_q = nn.Parameter(_identity_taps(num_heads, head_dim, K))
        self.conv_k = nn.Parameter(_identity_taps(num_kv_heads, head_dim, K))
        self.conv_v = nn.Parameter(_identity_taps(num_kv_heads, head_dim, K))
        self.conv_o = nn.Parameter(torch.zeros(num_heads, head_dim, K))
        self.memory_weight = nn.Parameter(torch.full((self.memories, num_heads), 1.0 / self.memories))
        self.gate_proj = nn.Linear(hidden_size, num_heads)  # 2 sigmoid(0) = 1: the gate starts open
        nn.init.zeros_(self.gate_proj.weight)
        nn.init.zeros_(self.gate_proj.bias)
        self.sink_proj = nn.Linear(hidden_size, num_heads)  # the share of the first token's value
        nn.init.zeros_(self.sink_proj.weight)
        nn.init.constant_(self.sink_proj.bias, self.SINK_SHARE_LOGIT)

    def _empty_history(self, q: torch.Tensor, heads: int) -> torch.Tensor:
        """[B, heads, K-1, D] zeros: a conv's inputs before the first token."""
        return q.new_zeros(q.shape[0], heads, self.conv_size - 1, q.shape[-1], dtype=torch.float32)

    def forward(self, q, k, v, x, state: GatedDeltaConvState | None = None, mask=None):
        B, H, T, D = q.shape
        seen = torch.zeros(B, dtype=torch.long, device=q.device) if state is None else state.seen
        tokens = Tokens.of(q, x, mask, seen)  # the mask checked before anything is computed
        if state is None:
            kv_history = self._empty_history(q, self.num_kv_heads)
            state = GatedDeltaConvState(
                None,
                self._empty_history(q, H),
                kv_history,
                kv_history,
                kv_history,
                v.new_zeros(B, self.num_kv_heads, D, dtype=torch.float32),
                seen,
            )
        real = tokens.real
        first = real & (tokens.positions == 0)  # [B, T]: the sequence's first real token
        at_first = v.float().gather(
            2, first.long().argmax(1)[:, None, None, None].expand(-1, v.shape[1], 1, D)
        )
        sink_v = torch.where(first.any(1)[:, None, None], at_first[:, :, 0], state.sink_v)  # [B, Hkv, D]
        qc, hq = causal_conv(q.float(), self.conv_q.float(), state.conv_q, mask)
        kc, hk = causal_conv(k.float(), self.conv_k.float(), state.conv_k, mask)
        vc, hv = causal_conv(v.float(), self.conv_v.float(), state.conv_v, mask)
        y, S = self.recur(qc, kc, vc, tokens, state.S)
        y = torch.einsum("bmhtd,mh->bhtd", y.reshape(B, self.memories, H, T, D), self.memory_weight.float())
        y = y * (2.0 * torch.sigmoid(self.read_x(self.gate_proj, x)))[..., None]
        local, ho = causal_conv(repeat_kv(vc, H), self.conv_o.float(), repeat_kv(state.conv_o, H), mask)
        ho = ho[:, :: self.kv_group_size]  # one history per key/value head: its query group's inputs agree
        share = torch.sigmoid(self.read_x(self.sink_proj, x))[..., None]
        y = (1.0 - share) * (y + local) + share * repeat_kv(sink_v[:, :, None], H)
        # the first token attends to itself alone: softmax gives its value exactly, q.S (no normalizer) does
        # not
        y = (
            torch.where(first[:, None, :, None], repeat_kv(v, H).float(), y) * real[:, None, :, None]
        )  # pads: 0
        return y.to(q.dtype), GatedDeltaConvState(S, hq, hk, hv, ho, sink_v, tokens.seen_after)
