"""`flow`: Flowformer's Flow-Attention, causal (see zoo.kernels.flow_attention for the formulas).

The paper's feature map is a plain sigmoid of q and k and Flow-Attention itself has no parameters. A
linearized layer needs something for attention transfer to train, so the sigmoid reads a learned
per-head linear map of q (per query head) and of k (per key/value head), W [D, F] starting as the
identity: at the start phi(x) = sigmoid(x), exactly the paper's map on the teacher's q and k.
"""

from __future__ import annotations

import torch

from zoo.kernels.flow_attention import FlowState, flow_attention
from zoo.mixers.base import Mixer, register_mixer, repeat_kv
from zoo.mixers.features import HeadwiseLinear
from zoo.mixers.options import Option
from zoo.mixers.tokens import real_tokens


@register_mixer("flow")
class FlowMixer(Mixer):
    family = "linear"
    state_size = "4*H*(F*D + 4F + 1) + 8 bytes (fp32 running sums), F = feature_dim (default D)"
    description = (
        "causal Flow-Attention: sigmoid features, source competition (causal softmax of conserved "
        "outflow) and sink allocation (sigmoid of conserved inflow)"
    )
    source = "Wu et al. 2022, Flowformer: Linearizing Transformers with Conservation Flows (arXiv:2202.06258)"
    options = {
        "feature_dim": Option(None, int, min=1, nullable=True, doc="features per head; null: head_dim"),
        "eps": Option(1e-6, float, above=0, doc="added to the incoming and outgoing flows"),
    }
    test_options = {"feature_dim": 8}

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options):
        super().__init__(num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options)
        self.feature_dim = int(self.config["feature_dim"] or head_dim)
        self.eps = float(self.config["eps"])
        self.feature_map_q = HeadwiseLinear(num_heads, head_dim, self.feature_dim)
        self.feature_map_k = HeadwiseLinear(num_kv_heads, head_dim, self.feature_dim)

    def features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sigmoid features [B, H, T, F] of q and of k (repeated to the query heads), fp32."""
        fq = torch.sigmoid(self.feature_map_q(q))
        fk = repeat_kv(torch.sigmoid(self.feature_map_k(k)), self.num_heads)
        return fq, fk

    def forward(self, q, k, v, x, state: FlowState | None = None, mask=None):
        real = real_tokens(mask, q)
        fq, fk = self.features(q, k)
        y, state = flow_attention(fq, fk, repeat_kv(v, self.num_heads), state=state, mask=real, eps=self.eps)
        return y.to(q.dtype), state
