"""Liger (Lan et al. 2025): gated recurrences whose gates reuse the key projection, no new parameters.

`liger-gla`: normalized gated linear attention with
- the feature map phi(x) = softmax(x) over the head dimension, for q and k (Liger's parameter-free map);
- one gate per key feature made by pooling the key projection's output:

      log g_t[d] = logsigmoid(rms(k_t[d], k_t[d +- D/2])) / tau        (tau 16, GLA's normalizer)

  The mixer sees k after RoPE, which rotates each pair of dimensions (d, d + D/2) by a position-
  dependent angle. Pooling over a head (a mean of k) or reading k per dimension would make the gate
  swing with position; the RMS over each rotated pair is exactly what RoPE leaves unchanged, so the
  gate is the pooled pre-RoPE key magnitude of that frequency: a pooling of the key projection that
  depends on the token, not on where it sits. Per feature (GLA-style) rather than a scalar per head:
  each frequency pair keeps its own memory length. Since the RMS is >= 0, g starts in [0.5^(1/16), 1):
  mild recency, never faster than a half-life of 16 tokens; LoRA on k_proj reshapes it (stage 2).
  Gates are per key/value head, shared by the query heads of a group, like the keys they pool.

`liger`: Liger Attention, an intra-layer hybrid of that gated recurrence and sliding-window softmax:

      y = alpha * liger-gla(q, k, v) + (1 - alpha) * SWA_W(q, k, v)       (alpha 0.5, W 64)

  Each branch is normalized on its own, as in Liger (unlike `lolcats`, whose two branches share one
  normalizer and learn the mix). The window branch is zoo.kernels.window_hybrid with a = 1, b = 0
  (window softmax alone); its state caches the last W keys and values. The state is a LigerState of
  the two sub-states. With `sinks` = S > 0 (not in Liger), the window branch also attends to the first S
  tokens (StreamingLLM's attention sinks), as the free window that long-context results are measured
  against does. Set `mixer.branch` to "window" or "linear" at eval time for the ablations
  (alpha 0 or 1; both states are still built, so splitting stays exact). With `learn_alpha` (not in
  Liger) alpha is one trained weight per query head, starting at `alpha`: the layer's only parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels.dispatch import linear_attention, window_hybrid
from zoo.kernels.linear_attention import LinearAttentionState
from zoo.kernels.window_hybrid import WindowHybridState
from zoo.mixers.base import register_mixer, repeat_kv
from zoo.mixers.features import softmax_features
from zoo.mixers.gated import GatedLinearMixer
from zoo.mixers.options import Option
from zoo.mixers.tokens import Tokens

SOURCE = "Lan et al. 2025, Liger: Linearizing LLMs to Gated Recurrent Structures (arXiv:2503.01496)"


def rotary_pair_rms(k: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D]: for each d, the RMS of (k[d], k[d +- D/2]), the pair RoPE rotates together.
    Invariant under RoPE (and any rotation of each pair)."""
    half = k.shape[-1] // 2
    a, b = k.float()[..., :half], k.float()[..., half:]
    r = ((a * a + b * b) * 0.5).sqrt()
    return torch.cat([r, r], dim=-1)


@register_mixer("liger-gla")
class LigerGLAMixer(GatedLinearMixer):
    state_size = "4*Hkv*(D*D + D) bytes (fp32 S and z)"
    description = (
        "Liger gated linear attention: softmax feature map, per-feature gates pooled from k; no parameters"
    )
    source = SOURCE
    options = {
        "tau": Option(16.0, float, above=0, doc="gate logit normalizer: log g = logsigmoid(pool(k)) / tau"),
    }
    gates_per_kv_head = True  # pooled from k: the state is kept once per key/value head
    test_options = {"tau": 2.0}  # gates strong enough to forget within the tests' sequences

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options):
        super().__init__(num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options)
        self.tau = float(self.config["tau"])
        if head_dim % 2:
            raise ValueError(f"{self.name}: needs an even head_dim (gates pool RoPE pairs), got {head_dim}")

    def feature_map(self, h, is_query, tokens):
        return softmax_features(h)

    def log_gate(self, q, k, tokens):
        return repeat_kv(F.logsigmoid(rotary_pair_rms(k)) / self.tau, self.num_heads)


@dataclass
class LigerState:
    """Liger Attention's state: the gated recurrence's (S, z) and the window's last W keys/values."""

    linear: LinearAttentionState
    window: WindowHybridState

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.linear if t is not None) + self.window.nbytes()


@register_mixer("liger")
class LigerMixer(LigerGLAMixer):
    family = "hybrid"
    state_size = (
        "4*Hkv*(D*D + D) bytes (fp32 gated state) + W*Hkv*(2D + 1) input-dtype values (last W keys, "
        "values) + 4*Hkv*(D + 1) + 8 bytes + S*Hkv*2D (first S keys, values; S = sinks, 0 by default)"
    )
    description = (
        "Liger Attention: alpha * liger-gla + (1 - alpha) * sliding-window softmax (W tokens); "
        "no parameters (learn_alpha: one per head)"
    )
    options = {
        "tau": 16.0,
        "window": Option(64, int, min=1, doc="sliding-window softmax over the last W tokens"),
        "alpha": Option(0.5, float, min=0, max=1, doc="weight of the gated branch (1 - alpha on the window)"),
        "sinks": Option(
            0, int, min=0, doc="first tokens kept as softmax keys of the window branch (sinks); 0: Liger"
        ),
        "learn_alpha": Option(
            False, bool, doc="alpha per query head, starting at `alpha`, trained (not in Liger); false: Liger"
        ),
    }
    test_options = {"tau": 2.0, "window": 4, "sinks": 2, "learn_alpha": True}
    #: a learned alpha is sigmoid(ALPHA_STEP * alpha_logit): Adam's ~lr-sized steps move the logit by
    #: ALPHA_STEP * lr, so that a stage's few dozen steps can take a head's mix far from where it starts
    ALPHA_STEP: float = 4.0
    BRANCHES = ("both", "window", "linear")

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options):
        super().__init__(num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options)
        self.window, self.alpha = int(self.config["window"]), float(self.config["alpha"])
        self.sinks = int(self.config["sinks"])
        self.branch = "both"
        self.alpha_logit = None
        if self.config["learn_alpha"]:
            if not 0.0 < self.alpha < 1.0:
                raise ValueError(f"{self.name}: learn_alpha needs 0 < alpha < 1, got {self.alpha}")
            start = math.log(self.alpha / (1.0 - self.alpha)) / self.ALPHA_STEP
            self.alpha_logit = nn.Parameter(torch.full((num_heads,), start))

    def mix(self) -> float | torch.Tensor:
        """The weight of the gated branch, following `self.branch`: a number, or [H, 1, 1] fp32 (one per
        query head) where alpha is learned."""
        if self.branch not in self.BRANCHES:
            raise ValueError(f"branch must be one of {self.BRANCHES}, got {self.branch!r}")
        if self.branch == "both" and self.alpha_logit is not None:
            return torch.sigmoid(self.ALPHA_STEP * self.alpha_logit.float())[:, None, None]
        return {"both": self.alpha, "window": 0.0, "linear": 1.0}[self.branch]

    def forward(self, q, k, v, x, state: LigerState | None = None, mask: torch.Tensor | None = None):
        alpha = self.mix()
        tokens = Tokens.of(q, x, mask)
        fq, fk, vg, g = self.gated_inputs(q, k, v, tokens)
        y_lin, lin = linear_attention(
            fq,
            fk,
            vg,
            log_gate=g,
            state=None if state is None else state.linear,
            normalize=True,
            eps=self.eps,
            kv_groups=self.state_groups(),
        )
        k, v = tokens.zero_padding(k, v)  # one per key/value head: the kernels repeat them if needed
        none = q.new_zeros(*q.shape[:3], 1)  # b = 0: the kernel's linear features are unused, 1 wide
        y_win, win = window_hybrid(
            q,
            k,
            v,
            none,
            none[:, : k.shape[1]],
            1.0,
            0.0,
            window=self.window,
            scale=self.head_dim**-0.5,
            state=None if state is None else state.window,
            key_mask=tokens.mask,
            kv_groups=self.kv_group_size,
            sinks=self.sinks,
        )
        y = alpha * y_lin.float() + (1.0 - alpha) * y_win.float()
        return y.to(v.dtype), LigerState(lin, win)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, branch={self.branch!r}"
