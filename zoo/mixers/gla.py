"""`gla` (Yang et al. 2024): gated linear attention (the base in zoo.mixers.gated) with Hedgehog feature
maps phi(x) = [softmax(x W), softmax(-x W)] per head (W [D, F] starting as the identity, as `hedgehog`),
and one gate per feature and query head made from the layer input x by a low-rank projection, as in GLA:

    log g_t = logsigmoid(W_up W_down x_t + b) / tau        (rank 16, tau 16 by default)

Init: b = `gate_bias` (6: g = sigmoid(6)^(1/16), a log decay of -1.5e-4 per token, 0.96 over 256
tokens) and W_up ~ N(0, 1e-2^2), so the converted layer starts as Hedgehog linear attention with its
identity feature maps (the closest parameter-light start to the softmax teacher found here) and the
gates are free to learn where forgetting helps. W_up is small but not zero, so gradients reach
W_down from the first step.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels import native
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
        B, T, _ = tokens.x.shape
        h = F.linear(tokens.x.float(), self.gate_down.weight.float())  # [B, T, rank]
        fused = self._log_gate_in_c(h)
        if fused is not None:
            return fused
        logits = F.linear(h, self.gate_up.weight.float(), self.gate_up.bias.float())
        g = F.logsigmoid(logits) / self.tau  # [B, T, H * F]
        return g.view(B, T, self.num_heads, self.num_features).transpose(1, 2)

    def _log_gate_in_c(self, h: torch.Tensor) -> torch.Tensor | None:
        """The gate [B, H, T, F] from h [B, T, rank] in one C pass (zoo/kernels/csrc/low_rank_gate.c): on
        the CPU in fp32 without gradients, where the kernel builds; else None."""
        w, b = self.gate_up.weight, self.gate_up.bias
        if (
            h.device.type != "cpu"
            or h.dtype != torch.float32
            or w.dtype != torch.float32
            or h.numel() == 0
            or (torch.is_grad_enabled() and (h.requires_grad or w.requires_grad or b.requires_grad))
        ):
            return None
        fn = native.function(
            "low_rank_gate",
            "zoo_low_rank_log_gate_f32",
            [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 3 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int],
        )
        if fn is None:
            return None
        B, T, rank = h.shape
        h, wt, b = h.contiguous(), w.t().contiguous(), b.contiguous()
        out = h.new_empty(B, self.num_heads, T, self.num_features)
        args = (B, T, rank, self.num_heads, self.num_features, h.data_ptr(), wt.data_ptr(), b.data_ptr())
        if fn(*args, 1.0 / self.tau, out.data_ptr(), torch.get_num_threads()):
            return None  # the kernel could not allocate its scratch
        return out
