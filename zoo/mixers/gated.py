"""Gated linear attention: the base of `gla`, `liger-gla`, `liger` and `retention`.

Every gated mixer here runs the one recurrence of zoo.kernels.linear_attention, normalized:

    S_t = diag(g_t) S_{t-1} + phi(k_t)^T v_t,   z_t = g_t * z_{t-1} + phi(k_t),
    y_t = phi(q_t) S_t / phi(q_t) . z_t

A subclass supplies only the feature map (`feature_map`, the hook of zoo.mixers.feature_map.FeatureMapped)
and the log gate (`log_gate`: [B, H, T] for one decay per head, [B, H, T, F] for one per feature); both
get the call's `Tokens` (the layer input x, the mask, the positions). Padding (mask 0) zeroes phi(k) and v
and sets the log gate to 0, so a padded token neither writes nor decays the state. The state is the
kernel's LinearAttentionState (S [B, H, F, D], z [B, H, F]), fp32.
"""

from __future__ import annotations

import torch

from zoo.kernels.dispatch import linear_attention
from zoo.mixers.base import repeat_kv
from zoo.mixers.feature_map import FeatureMapped
from zoo.mixers.tokens import Tokens


class GatedLinearMixer(FeatureMapped):
    """Normalized gated linear attention with a feature map and a gate. Not registered itself."""

    family = "gated"
    #: added to the normalizer phi(q) . z
    eps: float = 1e-6
    #: True when `log_gate` is computed per key/value head and repeated (then a query group shares a state)
    gates_per_kv_head: bool = False

    def log_gate(self, q: torch.Tensor, k: torch.Tensor, tokens: Tokens) -> torch.Tensor | None:
        """log g <= 0 per query head: [B, H, T] or [B, H, T, F] (fp32), or None for no decay. q [B, H, T, D],
        k [B, Hkv, T, D] as the mixer got them; the layer input is tokens.x."""
        raise NotImplementedError

    def gated_inputs(self, q, k, v, tokens: Tokens):
        """What the kernel takes: phi(q), phi(k), v (repeated to the query heads) and the log gate, with
        padded tokens made inert."""
        fq, fk = self.features(q, k, tokens)
        fk, v, g = tokens.zero_padding(fk, repeat_kv(v, self.num_heads), self.log_gate(q, k, tokens))
        return fq, fk, v, g

    def state_groups(self) -> int:
        """Heads sharing one state: a query group when the gates are per key/value head too
        (`gates_per_kv_head`), else 1 (a gate per query head gives each its own state)."""
        return self.kv_group_size if self.gates_per_kv_head else 1

    def forward(self, q, k, v, x, state=None, mask=None):
        tokens, state = self.tokens_and_state(q, x, state, mask)
        fq, fk, v, g = self.gated_inputs(q, k, v, tokens)
        y, state = linear_attention(
            fq, fk, v, log_gate=g, state=state, normalize=True, eps=self.eps, kv_groups=self.state_groups()
        )
        return y, self.carry(tokens, state)
