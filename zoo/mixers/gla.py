"""`gla` (Yang et al. 2024): gated linear attention (the base in zoo.mixers.gated) with Hedgehog feature
maps phi(x) = [softmax(x W), softmax(-x W)] per head (W [D, F] starting as the identity, as `hedgehog`),
and one gate per feature and query head made from the layer input x by a low-rank projection, as in GLA:

    log g_t = logsigmoid(W_up W_down x_t + b) / tau        (rank 16, tau 16 by default)

Init: b = `gate_bias` (6: g = sigmoid(6)^(1/16), a log decay of -1.5e-4 per token, 0.96 over 256
tokens) and W_up ~ N(0, 1e-2^2), so the converted layer starts as Hedgehog linear attention with its
identity feature maps (the closest parameter-light start to the softmax teacher found here) and the
gates are free to learn where forgetting helps. W_up is small but not zero, so gradients reach
W_down from the first step.

The gate is zoo.kernels.low_rank_gate's: written once in the heads' layout, in C on the CPU in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels.low_rank_gate import low_rank_log_gate
from zoo.mixers.base import register_mixer
from zoo.mixers.features import HeadwiseLinear, hedgehog_of
from zoo.mixers.gated import GatedLinearMixer
from zoo.mixers.options import Option


@register_mixer("gla")
class GLAMixer(GatedLinearMixer):
    state_size = "4*H*(2F*D + 2F) bytes (fp32 S and z), F = feature_dim (default D)"
    description = (
        "gated linear attention: Hedgehog feature maps + per-feature gates logsigmoid(low-rank(x))/tau, "
        "starting near no decay"
    )
    source = (
        "Yang et al. 2024, Gated Linear Attention Transformers (arXiv:2312.06635); "
        "Hedgehog (arXiv:2402.04347)"
    )
    options = {
        "feature_dim": Option(
            None, int, min=1, nullable=True, doc="projections per head (2x as many features); null: head_dim"
        ),
        "rank": Option(16, int, min=1, doc="rank of the gate projection x -> gate logits"),
        "tau": Option(16.0, float, above=0, doc="gate logit normalizer: log g = logsigmoid(.) / tau"),
        "gate_bias": Option(
            6.0,
            float,
            doc="initial gate logit: the start's log decay per token is logsigmoid(gate_bias) / tau",
        ),
    }
    test_options = {"feature_dim": 8, "rank": 4, "gate_bias": 1.0}

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

    def feature_map(self, h, is_query, tokens):
        return hedgehog_of(self.feature_map_q if is_query else self.feature_map_k, h)

    def log_gate(self, q, k, tokens):
        h = F.linear(tokens.x.float(), self.gate_down.weight.float())  # [B, T, rank]
        return low_rank_log_gate(h, self.gate_up.weight, self.gate_up.bias, 1.0 / self.tau, self.num_heads)
