"""`mamba2`: a scalar-decay selective state space mixer (Mamba2's SSD) initialized from the teacher.

Per head, with x = conv(v) (a short causal depthwise convolution over v), C = q W_C, B = k W_B:

    dt_t = softplus(W_dt u_t / sqrt(hidden) + dt_bias)    u: the layer input; one dt per head and step
    S_t  = exp(dt_t A) S_{t-1} + phi(B_t)^T (dt_t x_t),   A = -exp(A_log) per head
    y_t  = phi(C_t) S_t / (phi(C_t) z_t) + D x_t,         z_t: the same recurrence with x_t = 1

As in Mamba-in-the-Llama, the teacher's projections give C, B and x: the wrapper already applies W_Q,
W_K, W_V (and RoPE), so the mixer reads q, k, v as they come. Mamba-in-the-Llama then trains the C/B
projections it initialized from W_Q/W_K; here W_Q, W_K stay frozen in the shared wrapper (LoRA's
targets in stage 2), so the trainable part is a right factor per head, W_C, W_B [D, D], starting as
the identity: W_Q W_C starts as W_Q, C as the teacher's q, B as its k, x as its v (the conv starts as
the identity). Nothing is random. Under grouped-query attention B and x are shared by a query group,
as Mamba2's groups share B. (Without W_C, W_B, only dt, A, D, the conv and a temperature were left to
train: on SmolLM2-135M with 4 stage-1 steps, held-out perplexity went 1980 -> 1817, where GLA's
learned maps went 1965 -> 218.)

Starting near the teacher (measured on SmolLM2-135M, 7 layers, 512 tokens of Austen; relative MSE
of the attention output against softmax, zero output = 1.0): Mamba2's raw readout C S (no
normalizer, q.k/sqrt(D) as the score) is far off, ~220, because its weights are signed and its
output grows with the context. Normalizing needs positive scores, so C and B pass through the
map phi(x) = [softmax(x), softmax(-x)] over the head dimension (Hedgehog's). At W = I that scored
0.91, better than elu+1 (1.06), [relu(x), relu(-x)] (1.05), sigmoid (1.07) or the full 2nd-order
Taylor map (1.03). Since dt multiplies both S and z, it acts as a per-token importance (Mamba's
selectivity) and a decay, not as an output scale.

Scales for attention transfer at lr 1e-2 (Adam moves every parameter by ~lr per step whatever its
gradient): W_dt u is divided by sqrt(hidden), as u is RMS-normalized and a step on every weight would
otherwise move dt's exponent by up to lr * hidden at once; the conv taps and D sit on the value path and
are stored at 1/10 scale (STEP). Without these, 12 steps raised the transfer MSE of tiny test models.

Init: W_dt = 0, A = -1 and dt = softplus(dt_bias) spread log-uniformly over heads in [dt_min, dt_max]
(default 1e-3 .. 1e-2: memory horizons of 100 .. 1000 tokens; a teacher attends far back, and faster
decay measured worse, 1e-3 .. 1e-1 gave 1.02); the conv is the identity (its last tap 1, no
activation, so x = v); D = 0. Every parameter is deterministic: the converted layer is a function
of the teacher's weights alone.

State: the kernel's (S [B, H, 2D, D], z [B, H, 2D]) plus the conv's last conv_size-1 inputs; padding
skips both (the conv reads the previous real tokens, the recurrence neither decays nor adds).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels.dispatch import linear_attention
from zoo.kernels.linear_attention import LinearAttentionState
from zoo.kernels.short_conv import causal_conv
from zoo.mixers.base import Mixer, decay_bias, register_mixer, repeat_kv
from zoo.mixers.features import HeadwiseLinear, hedgehog_of
from zoo.mixers.options import Option
from zoo.mixers.tokens import Tokens


class Mamba2State(NamedTuple):
    S: torch.Tensor  # [B, H, F, D] fp32
    z: torch.Tensor  # [B, H, F] fp32
    conv: torch.Tensor  # [B, Hkv, conv_size - 1, D]: the last real inputs of the conv (zeros before any)


@register_mixer("mamba2")
class Mamba2Mixer(Mixer):
    family = "ssm"
    state_size = "4*H*(2D*D + 2D) bytes (fp32 S, z) + 4*(conv_size-1)*Hkv*D bytes (fp32 conv history)"
    description = (
        "Mamba2 SSD: scalar per-head decay exp(dt*A), dt from the input, C/B/x = teacher q/k/v, short conv"
    )
    source = (
        "Dao & Gu 2024, Transformers are SSMs (Mamba2, arXiv:2405.21060); Wang et al. 2024, "
        "The Mamba in the Llama (arXiv:2408.15237)"
    )
    options = {
        "conv_size": Option(4, int, min=1, doc="taps of the causal depthwise conv over x (= v); 1: none"),
        "dt_min": Option(1e-3, float, above=0, doc="initial dt of head 0, log-spaced over heads to dt_max"),
        "dt_max": Option(1e-2, float, above=0, doc="initial dt of the last head (>= dt_min)"),
    }
    test_options = {"conv_size": 3, "dt_min": 0.05, "dt_max": 0.5}
    eps: float = 1e-6
    #: the conv taps and D act on the value path directly, so a change of lr in one moves the output by
    #: lr * |v|; they are stored at this scale (the effective value is STEP * parameter), so that Adam's
    #: ~lr-sized steps move them by STEP * lr
    STEP: float = 0.1

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options):
        super().__init__(num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options)
        K, lo, hi = int(self.config["conv_size"]), float(self.config["dt_min"]), float(self.config["dt_max"])
        if lo > hi:
            raise ValueError(f"mamba2: need dt_min <= dt_max, got dt_min={lo}, dt_max={hi}")
        self.conv_size = K
        self.dt_proj = nn.Linear(hidden_size, num_heads, bias=False)
        nn.init.zeros_(self.dt_proj.weight)
        self.dt_bias = nn.Parameter(decay_bias(lo, hi, num_heads))
        self.A_log = nn.Parameter(torch.zeros(num_heads))  # A = -exp(A_log) = -1
        self.D = nn.Parameter(torch.zeros(num_heads))  # the skip is STEP * D
        self.conv_delta = nn.Parameter(
            torch.zeros(num_kv_heads, head_dim, K)
        )  # conv = identity + STEP * delta
        self.c_map = HeadwiseLinear(num_heads, head_dim, head_dim)  # C = q W_C, W_C = I at the start
        self.b_map = HeadwiseLinear(num_kv_heads, head_dim, head_dim)  # B = k W_B (per key/value head)

    def conv_weight(self) -> torch.Tensor:
        """[Hkv, D, K] fp32: the identity (last tap 1: the current token) plus STEP * conv_delta."""
        w = self.STEP * self.conv_delta.float()
        return torch.cat([w[..., :-1], 1.0 + w[..., -1:]], dim=-1)

    def forward(self, q, k, v, x, state: Mamba2State | None = None, mask=None):
        B, H, T, Dh = q.shape
        tokens = Tokens.of(q, x, mask)
        history = (
            v.new_zeros(B, self.num_kv_heads, self.conv_size - 1, Dh, dtype=torch.float32)
            if state is None
            else state.conv
        )
        xs, history = causal_conv(v.float(), self.conv_weight(), history, mask)
        sel = self.dt_proj(x).float().transpose(1, 2) * self.hidden_size**-0.5
        dt = F.softplus(sel + self.dt_bias.float()[:, None])  # [B, H, T]
        log_gate = dt * -self.A_log.float().exp()[:, None]
        fk = repeat_kv(hedgehog_of(self.b_map, k), H) * dt[..., None]  # phi(B_t) dt_t
        log_gate, fk = tokens.zero_padding(log_gate, fk)  # padding neither decays nor adds
        xs = repeat_kv(xs, H)
        lin = None if state is None else LinearAttentionState(state.S, state.z)
        y, lin = linear_attention(
            hedgehog_of(self.c_map, q),
            fk,
            xs,
            log_gate=log_gate,
            state=lin,
            normalize=True,
            eps=self.eps,
        )
        y = y + self.STEP * self.D.float()[:, None, None] * xs
        return y.to(q.dtype), Mamba2State(lin.S, lin.z, history)
