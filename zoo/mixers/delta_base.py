"""The delta-rule base of `delta`, `gated-delta` and `gated-delta-conv` (its parameterization and the
measurements behind it: zoo.mixers.delta).

    S_t = g_t (S_{t-1} - beta_t k_t (k_t^T S_{t-1})) + beta_t k_t v_t^T        y_t = q_t S_t

Hooks, each given the call's `Tokens` (the layer input x, the mask, the positions): `features` (phi(q),
phi(k) = L2norm(act(x W)) per head by default) and `log_gate` (None: no decay; `GatedDeltaRuleMixer`
makes the Mamba2-style gate). beta_t = sigmoid(x W_beta + b) per query head. Padding (mask 0): beta = 0 and
log g = 0 there, so padded tokens neither write nor decay anything. GQA: keys and values are repeated to
the query heads; beta, the gate and the state are per query head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels.dispatch import delta_rule
from zoo.mixers.base import Mixer, decay_bias, repeat_kv
from zoo.mixers.features import HeadwiseLinear, hedgehog_features
from zoo.mixers.options import Option
from zoo.mixers.tokens import Tokens

#: the activations `act` of the feature maps phi = L2norm(act(x W)), by option value
ACTIVATIONS = {
    "identity": lambda h: h,
    "silu": F.silu,
    "relu": torch.relu,
    "hedgehog": hedgehog_features,
}


class DeltaRuleMixer(Mixer):
    """The delta rule with learned feature maps and write strength. Not registered itself.

    A head may hold several memories (`memories`, 1 here): each its own feature maps, write strength
    and gate over the head's q, k, v, stacked memory-major along the head axis of the kernel's rows
    (memory m of head h is row m * H + h), so one delta-rule call runs them all."""

    family = "delta"
    source = (
        "Yang et al. 2024, Parallelizing Linear Transformers with the Delta Rule over Sequence Length "
        "(DeltaNet, arXiv:2406.06484)"
    )
    options = {
        "feature_dim": Option(
            None, int, min=1, nullable=True, doc="F, the projections per head; null: head_dim"
        ),
        "feature_map": Option(
            "silu",
            str,
            choices=tuple(ACTIVATIONS),
            doc="act in phi = L2norm(act(x W)); hedgehog gives 2F features",
        ),
        "beta_init": Option(0.5, float, above=0, below=1, doc="the write strength every head starts with"),
    }
    test_options = {"feature_dim": 8}
    #: memories per head (rows of the kernel per query head)
    memories: int = 1

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options):
        super().__init__(num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options)
        self.feature_dim = int(self.config["feature_dim"] or head_dim)
        b0 = float(self.config["beta_init"])
        self.act = ACTIVATIONS[self.config["feature_map"]]
        M = self.memories
        self.q_map = HeadwiseLinear(M * num_heads, head_dim, self.feature_dim, init="signed")
        self.k_map = HeadwiseLinear(M * num_kv_heads, head_dim, self.feature_dim, init="signed")
        self.beta_proj = nn.Linear(hidden_size, M * num_heads)
        nn.init.zeros_(self.beta_proj.weight)
        nn.init.constant_(self.beta_proj.bias, math.log(b0 / (1.0 - b0)))

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """[B, h, T, D] -> [B, M * h, T, D]: the same heads once per memory."""
        return t if self.memories == 1 else t.repeat(1, self.memories, 1, 1)

    def _to_query_rows(self, t: torch.Tensor) -> torch.Tensor:
        """[B, M * Hkv, T, X] -> [B, M * H, T, X]: each memory's key/value heads repeated to its query
        heads."""
        B, _, T, X = t.shape
        t = t.reshape(B * self.memories, self.num_kv_heads, T, X)
        return repeat_kv(t, self.num_heads).reshape(B, self.memories * self.num_heads, T, X)

    def features(self, q: torch.Tensor, k: torch.Tensor, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """phi(q) [B, M*H, T, F'] and phi(k) repeated to the query heads, fp32, both of unit norm."""
        fq = F.normalize(self.act(self.q_map(self._rows(q))), dim=-1)
        fk = F.normalize(self.act(self.k_map(self._rows(k))), dim=-1)
        return fq, self._to_query_rows(fk)

    def read_x(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """The layer input x [B, T, hidden] through `layer` (a value per kernel row) -> [B, rows, T] fp32."""
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x.float(), layer.weight.float(), bias).transpose(1, 2)

    def log_gate(self, tokens: Tokens) -> torch.Tensor | None:
        """log g [B, M*H, T] (<= 0), or None for no decay."""
        return None

    def recur(self, q, k, v, tokens: Tokens, state=None):
        """The delta rule over every memory: y [B, M*H, T, D] and the state S [B, M*H, F', D]."""
        fq, fk = self.features(q, k, tokens)
        v = self._rows(repeat_kv(v, self.num_heads))
        beta = torch.sigmoid(self.read_x(self.beta_proj, tokens.x))
        # padded tokens neither write (beta = 0) nor decay (log g = 0); their k, v are zeroed to stay finite
        beta, log_gate, fk, v = tokens.zero_padding(beta, self.log_gate(tokens), fk, v)
        return delta_rule(fq, fk, v, beta, log_gate, state=state)

    def forward(self, q, k, v, x, state=None, mask=None):
        tokens, state = self.tokens_and_state(q, x, state, mask)
        y, state = self.recur(q, k, v, tokens, state)
        return y, self.carry(tokens, state)


class GatedDeltaRuleMixer(DeltaRuleMixer):
    """The delta rule with Gated DeltaNet's gate log g_t = -exp(A_log) * softplus(x W_a + dt_bias), W_a and
    A_log at 0 and softplus(dt_bias) log-uniform in [dt_min, dt_max] over the heads (per memory: see
    `decay_ranges`). Not registered itself."""

    options = {
        **DeltaRuleMixer.options,
        "dt_min": Option(
            1e-3, float, above=0, doc="initial per-step decay rate -log g of head 0 (log-uniform to dt_max)"
        ),
        "dt_max": Option(1e-1, float, above=0, doc="initial per-step decay rate -log g of the last head"),
    }
    test_options = {"feature_dim": 8, "dt_min": 0.05, "dt_max": 0.5}  # forgetting within the tests

    def decay_ranges(self) -> list[tuple[float, float]]:
        """(dt_min, dt_max) of each memory: the range its heads' initial decay rates -log g span."""
        return [(float(self.config["dt_min"]), float(self.config["dt_max"]))]

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options):
        super().__init__(num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options)
        ranges = self.decay_ranges()
        if not all(0.0 < lo <= hi for lo, hi in ranges):
            raise ValueError(f"{self.name}: need 0 < dt_min <= dt_max in every decay range, got {ranges}")
        rows = self.memories * num_heads
        self.a_proj = nn.Linear(hidden_size, rows, bias=False)
        nn.init.zeros_(self.a_proj.weight)
        self.dt_bias = nn.Parameter(torch.cat([decay_bias(lo, hi, num_heads) for lo, hi in ranges]))
        self.A_log = nn.Parameter(torch.zeros(rows))

    def log_gate(self, tokens):
        dt = F.softplus(self.read_x(self.a_proj, tokens.x) + self.dt_bias.float()[:, None])
        return -self.A_log.float().exp()[:, None] * dt
