"""Gated linear attention: the shared gated base and `gla` (learned, data-dependent gates).

Every gated mixer here runs the one recurrence of zoo.kernels.linear_attention, normalized:

    S_t = diag(g_t) S_{t-1} + phi(k_t)^T v_t,   z_t = g_t * z_{t-1} + phi(k_t),   y_t = phi(q_t) S_t / phi(q_t) . z_t

A subclass supplies only the feature map (`features`) and the log gate (`log_gate`: [B, H, T] for one
decay per head, [B, H, T, F] for one per feature). Padding (mask 0) zeroes phi(k) and v and sets the
log gate to 0, so a padded token neither writes nor decays the state. The state is the kernel's
LinearAttentionState (S [B, H, F, D], z [B, H, F]), fp32.

`gla` (Yang et al. 2024): Hedgehog feature maps phi(x) = [softmax(x W), softmax(-x W)] per head
(W [D, F] starting as the identity, as `hedgehog`), and one gate per feature and query head made from
the layer input x by a low-rank projection, as in GLA:

    log g_t = logsigmoid(W_up W_down x_t + b) / tau        (rank 16, tau 16 by default)

Init: b = `gate_bias` (6: g = sigmoid(6)^(1/16), a log decay of -1.5e-4 per token, 0.96 over 256
tokens) and W_up ~ N(0, 1e-2^2), so the converted layer starts as Hedgehog linear attention with its
identity feature maps (the closest parameter-light start to the softmax teacher found here) and the
gates are free to learn where forgetting helps. W_up is small but not zero, so gradients reach
W_down from the first step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels.dispatch import linear_attention
from zoo.kernels.linear_attention import LinearAttentionState
from zoo.mixers.base import Mixer, register_mixer, repeat_kv
from zoo.mixers.feature_map import HeadwiseLinear
from zoo.mixers.hedgehog import hedgehog_features
from zoo.mixers.options import Option


class GatedLinearMixer(Mixer):
    """Normalized gated linear attention with a feature map and a gate. Not registered itself."""

    family = "gated"
    #: added to the normalizer phi(q) . z
    eps: float = 1e-6
    #: True when `log_gate` is computed per key/value head and repeated (then a query group shares a state)
    gates_per_kv_head: bool = False

    def features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """phi(q) [B, H, T, F] and phi(k) [B, Hkv, T, F] (per key/value head), non-negative fp32."""
        raise NotImplementedError

    def log_gate(self, q: torch.Tensor, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """log g <= 0 per query head: [B, H, T] or [B, H, T, F] (fp32), or None for no decay."""
        raise NotImplementedError

    def gated_inputs(self, q, k, v, x, mask):
        """What the kernel takes: phi(q), phi(k), v (repeated to the query heads) and the log gate,
        with padded tokens made inert."""
        fq, fk = self.features(q, k)
        fk, v = repeat_kv(fk, self.num_heads), repeat_kv(v, self.num_heads)
        g = self.log_gate(q, k, x)
        if mask is not None:
            if mask.shape != q.shape[:1] + q.shape[2:3]:
                raise ValueError(f"mask must be [B, T] = {tuple(q.shape[:1] + q.shape[2:3])}, got {tuple(mask.shape)}")
            pad = (mask.to(q.device) == 0)[:, None, :]  # [B, 1, T]
            fk, v = fk.masked_fill(pad[..., None], 0.0), v.masked_fill(pad[..., None], 0.0)
            if g is not None:
                g = g.masked_fill(pad if g.dim() == 3 else pad[..., None], 0.0)
        return fq, fk, v, g

    def state_groups(self) -> int:
        """Heads sharing one state: a query group when the gates are per key/value head too
        (`gates_per_kv_head`), else 1 (a gate per query head gives each its own state)."""
        return self.kv_group_size if self.gates_per_kv_head else 1

    def forward(self, q, k, v, x, state: LinearAttentionState | None = None, mask: torch.Tensor | None = None):
        fq, fk, v, g = self.gated_inputs(q, k, v, x, mask)
        return linear_attention(fq, fk, v, log_gate=g, state=state, normalize=True, eps=self.eps,
                                kv_groups=self.state_groups())


@register_mixer("gla")
class GLAMixer(GatedLinearMixer):
    state_size = "4*H*(2F*D + 2F) bytes (fp32 S and z), F = feature_dim (default D)"
    description = ("gated linear attention: Hedgehog feature maps + per-feature gates logsigmoid(low-rank(x))/tau, "
                   "starting near no decay")
    source = "Yang et al. 2024, Gated Linear Attention Transformers (arXiv:2312.06635); Hedgehog (arXiv:2402.04347)"
    options = {
        "feature_dim": Option(None, int, min=1, nullable=True,
                              doc="projections per head (2x as many features); null: head_dim"),
        "rank": Option(16, int, min=1, doc="rank of the gate projection x -> gate logits"),
        "tau": Option(16.0, float, above=0, doc="gate logit normalizer: log g = logsigmoid(.) / tau"),
        "gate_bias": Option(6.0, float, doc="initial gate logit: the start's log decay per token is "
                                            "logsigmoid(gate_bias) / tau"),
    }

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options):
        super().__init__(num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options)
        self.feature_dim = int(self.config["feature_dim"] or head_dim)
        self.num_features = 2 * self.feature_dim
        rank, self.tau = int(self.config["rank"]), float(self.config["tau"])
        self.feature_map_q = HeadwiseLinear(num_heads, head_dim, self.feature_dim)
        self.feature_map_k = HeadwiseLinear(num_kv_heads, head_dim, self.feature_dim)
        self.gate_down = nn.Linear(hidden_size, rank, bias=False)
        self.gate_up = nn.Linear(rank, num_heads * self.num_features, bias=True)
        with torch.no_grad():
            nn.init.normal_(self.gate_up.weight, std=1e-2)
            self.gate_up.bias.fill_(float(self.config["gate_bias"]))

    def features(self, q, k):
        return hedgehog_features(self.feature_map_q(q)), hedgehog_features(self.feature_map_k(k))

    def log_gate(self, q, k, x):
        B, T, _ = x.shape
        h = F.linear(x.float(), self.gate_down.weight.float())
        logits = F.linear(h, self.gate_up.weight.float(), self.gate_up.bias.float())
        g = F.logsigmoid(logits) / self.tau  # [B, T, H * F]
        return g.view(B, T, self.num_heads, self.num_features).transpose(1, 2)
