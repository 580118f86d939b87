"""The window hybrid: sliding-window softmax and feature-map linear attention in one layer, one normalizer.
The base of `lolcats` (and its variants), `lola` and `based-window`; `HedgehogWindowHybrid` (at the end) is
the one with Hedgehog feature maps that `lolcats` and `lola` share.

For query t (zoo.kernels.window_hybrid has the exact formula), keys inside the window get softmax weights
a * exp(q.k/sqrt(D) - m_t), older keys linear weights b * phi(q).phi(k), with one shared normalizer;
a = sigmoid(w) and b = 1 - a are learned per head. The first `sinks` tokens are softmax keys of every
query (attention sinks). `terraced`: blocks of `window` tokens, softmax over the previous block and
causally within the current one. A subclass supplies the feature map (`feature_map`, the hook of
zoo.mixers.feature_map.FeatureMapped) and the projections it reads (`feature_map_q`, `feature_map_k`,
made here as identity-initialized HeadwiseLinear maps of `feature_dim`).

Ablations: set `mixer.branch` at eval time (default "both"):
- "window": sliding-window softmax alone (a = 1, b = 0).
- "linear": linear attention alone over ALL past keys, window and sinks included (a = 0, b = c = 1,
  computed without sinks, which are never linear keys in the hybrid).
The state is the kernel's WindowHybridState, built the same way in every branch (so splitting and carrying
stay exact); it counts the real tokens seen (n), which gives the hooks their positions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from zoo.kernels.dispatch import hedgehog_window_hybrid_step, window_hybrid
from zoo.kernels.positions import common_count
from zoo.kernels.window_hybrid import WindowHybridState, window_hybrid_weights
from zoo.mixers.base import repeat_kv
from zoo.mixers.feature_map import FeatureMapped
from zoo.mixers.features import HeadwiseLinear, hedgehog_of
from zoo.mixers.options import Option
from zoo.mixers.tokens import Tokens


class WindowHybridMixer(FeatureMapped):
    """Window softmax + feature-map linear attention with learned per-head mixing. Not registered itself."""

    family = "hybrid"
    options = {
        "window": Option(
            64,
            int,
            min=0,
            doc="softmax window in tokens (block size when terraced); 0: none, "
            "allowed with sinks >= 1 on a plain window",
        ),
        "feature_dim": Option(
            None, int, min=1, nullable=True, doc="projections per head the feature map reads; null: head_dim"
        ),
        "window_factor": Option(
            0.5,
            float,
            above=0,
            below=1,
            doc="initial window share a of every head (the linear branch gets 1 - a)",
        ),
        "sinks": Option(
            0, int, min=0, doc="first tokens kept as softmax keys of every query (attention sinks)"
        ),
        "linear_mass_tokens": Option(
            None,
            int,
            min=1,
            nullable=True,
            doc="a query with more linear keys than this has its linear weights scaled by this number / its "
            "count, so the linear branch's share stops growing with the context; null: off (LoLCATs)",
        ),
        "linear_horizon": Option(
            None,
            int,
            min=1,
            nullable=True,
            doc="past this many linear keys (set it to the length trained at) the linear weights shrink "
            "further as this number / the count, so the layer leans on its window and sinks where its "
            "linear state holds more than it was trained on; null: off",
        ),
    }
    terraced = False
    BRANCHES = ("both", "window", "linear")

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options):
        super().__init__(num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options)
        self.window = int(self.config["window"])
        self.feature_dim = int(self.config["feature_dim"] or head_dim)
        self.sinks = int(self.config["sinks"])
        a0 = float(self.config["window_factor"])
        if self.window == 0 and (self.sinks < 1 or self.terraced):
            raise ValueError(
                f"{self.name}: need window >= 1 (or 0 with sinks >= 1, plain window); "
                f"got window=0, sinks={self.sinks}"
            )
        # projections of queries per head, of keys per key/value head
        self.feature_map_q = HeadwiseLinear(num_heads, head_dim, self.feature_dim)
        self.feature_map_k = HeadwiseLinear(num_kv_heads, head_dim, self.feature_dim)
        self.window_logit = nn.Parameter(torch.full((num_heads,), math.log(a0 / (1.0 - a0))))
        self.branch = "both"

    def factors(self):
        """(a, b, c) per head for the kernel, following `self.branch`. Without gradients (decoding) they are
        computed once per branch and value of the window logits, not at every token."""
        if self.branch not in self.BRANCHES:
            raise ValueError(f"branch must be one of {self.BRANCHES}, got {self.branch!r}")
        if torch.is_grad_enabled():
            return self._factors()
        logit = self.window_logit
        key = (self.branch, logit.data_ptr(), logit._version, logit.dtype, logit.device)
        memo = self.__dict__.get("_factors_memo")
        if memo is None or memo[0] != key:
            memo = self.__dict__["_factors_memo"] = (key, self._factors())
        return memo[1]

    def _factors(self):
        a = torch.sigmoid(self.window_logit.float())
        if self.branch == "window":
            return torch.ones_like(a), torch.zeros_like(a), None
        if self.branch == "linear":
            return torch.zeros_like(a), torch.ones_like(a), torch.ones_like(a)
        return a, 1.0 - a, None

    def features(self, q, k, tokens, per_kv_head=False):
        """phi(q), phi(k) of zoo.mixers.feature_map (per_kv_head: phi(k) once per key/value head), phi(q_t)
        scaled by `linear_mass_scale` of the linear keys of query t (`linear_keys`)."""
        fq, fk = super().features(q, k, tokens, per_kv_head)
        if self.config.get("linear_mass_tokens") or self.config.get("linear_horizon"):
            n = self.linear_keys(tokens.positions).to(fq.dtype)
            fq = fq * self.linear_mass_scale(n)[:, None, :, None]
        return fq, fk

    def linear_mass_scale(self, n: torch.Tensor | int) -> torch.Tensor | float:
        """What a query with n linear keys ([B, T] or an int) scales its features by: min(1, N / n) with
        `linear_mass_tokens` = N (the linear branch's total weight then grows with the context only up to N
        keys' worth), times min(1, H / n) with `linear_horizon` = H (past H keys, more than it was trained
        on, it shrinks)."""
        scale = 1.0
        for limit in (self.config.get("linear_mass_tokens"), self.config.get("linear_horizon")):
            if limit:
                scale = scale * limit / (n.clamp(min=limit) if isinstance(n, torch.Tensor) else max(n, limit))
        return scale

    def linear_keys(self, positions: torch.Tensor | int) -> torch.Tensor | int:
        """[B, T] (or one position, an int) -> the number of linear keys of the query at each position under
        `self.branch`: the keys outside its window (the previous and current block when terraced), sinks
        excluded."""
        window, sinks = self.window_and_sinks()
        if self.branch == "linear":
            return positions + 1
        if isinstance(positions, int):
            older = (
                max(positions // window - 1, 0) * window if self.terraced else max(positions + 1 - window, 0)
            )
            return max(older - sinks, 0)
        if self.terraced:
            older = ((positions // window) - 1).clamp(min=0) * window
        else:
            older = (positions + 1 - window).clamp(min=0)
        return (older - sinks).clamp(min=0)

    def window_and_sinks(self) -> tuple[int, int]:
        """(window, sinks) for the kernel. The linear branch alone is linear attention over all keys: the
        sinks are not taken out of it, and the window does not matter (a = 0, b = c = 1 gives every key its
        linear weight)."""
        if self.branch == "linear":
            return max(self.window, 1), 0
        return self.window, self.sinks

    def forward(self, q, k, v, x, state=None, mask=None):
        seen = torch.zeros(q.shape[0], dtype=torch.long, device=q.device) if state is None else state.n
        tokens = Tokens.of(q, x, mask, seen)
        fq, fk = self.features(q, k, tokens, per_kv_head=True)
        k, v, fk = tokens.zero_padding(k, v, fk)  # one per key/value head: the kernels repeat them if needed
        a, b, c = self.factors()
        window, sinks = self.window_and_sinks()
        return window_hybrid(
            q,
            k,
            v,
            fq,
            fk,
            a,
            b,
            c=c,
            window=window,
            terraced=self.terraced,
            scale=self.head_dim**-0.5,
            state=state,
            key_mask=tokens.mask,
            sinks=sinks,
            kv_groups=self.kv_group_size,
        )

    def attention_weights(self, q, k):
        fq, fk = self.features(q, k, Tokens.whole(q))
        a, b, c = self.factors()
        window, sinks = self.window_and_sinks()
        return window_hybrid_weights(
            q,
            repeat_kv(k, self.num_heads),
            fq,
            fk,
            a,
            b,
            c=c,
            window=window,
            terraced=self.terraced,
            scale=self.head_dim**-0.5,
            sinks=sinks,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, branch={self.branch!r}"


class HedgehogWindowHybrid(WindowHybridMixer):
    """The window hybrid with Hedgehog feature maps phi(x) = [softmax(x W), softmax(-x W)] (W per head,
    identity at the start): the layer of the lolcats mixers and of `lola`. Not registered itself."""

    source = "LoLCATs (Zhang et al. 2024, arXiv:2410.10254); Hedgehog (Zhang et al. 2024, arXiv:2402.04347)"
    options = {
        "window": 64,
        "feature_dim": Option(
            None,
            int,
            min=1,
            nullable=True,
            doc="Hedgehog projections per head (2x as many features); null: head_dim",
        ),
        "window_factor": 0.5,
        "sinks": 0,
        "linear_mass_tokens": None,
        "linear_horizon": None,
    }
    test_options = {"window": 4, "feature_dim": 8}

    def feature_map(self, h, is_query, tokens):
        return hedgehog_of(self.feature_map_q if is_query else self.feature_map_k, h)

    def forward(self, q, k, v, x, state=None, mask=None):
        fused = self._decode_in_one_call(q, k, v, state, mask)
        return fused if fused is not None else super().forward(q, k, v, x, state, mask)

    def _next_token_in_c(self, q, k, v, state, mask):
        """The next token of a decoding whose last token ran in C: its state carries that C step, bound to
        this layer's weights and its backend chosen then, and the step runs again after checking only what
        can change from one token to the next (one token per row, no padding, no gradient, the same
        weights); else None, and the full checks run."""
        step = getattr(state, "c_step", None)
        if step is None or mask is not None or q.shape[2] != 1 or torch.is_grad_enabled():
            return None
        a, b, c = self.factors()
        if not step.made_for(
            a, b, c, (self.feature_map_q.weight, self.feature_map_k.weight), self.head_dim**-0.5
        ):
            return None
        return step.next_token(q, k, v, state, self._query_feature_scale(state.position))

    def _query_feature_scale(self, position: int) -> float:
        """What the query's features are scaled by at `position` (see `features`)."""
        return float(self.linear_mass_scale(self.linear_keys(position)))

    def _decode_in_one_call(self, q, k, v, state, mask):
        """A decoding step (one token per row, no padding, no gradient) with features and all as one C call
        (zoo.kernels.dispatch.hedgehog_window_hybrid_step), or None: the general path then runs."""
        fused = self._next_token_in_c(q, k, v, state, mask)
        if fused is not None:
            return fused
        maps = self._decoding_maps(q, k, v, state, mask, WindowHybridState)
        if maps is None:
            return None
        a, b, c = self.factors()
        window, sinks = self.window_and_sinks()
        return hedgehog_window_hybrid_step(
            q,
            k,
            v,
            *maps[:2],
            a,
            b,
            c=c,
            window=window,
            terraced=self.terraced,
            state=state,
            scale=self.head_dim**-0.5,
            fq_scale=maps[2],
            sinks=sinks,
        )

    def _decoding_maps(self, q, k, v, state, mask, state_type):
        """(Wq, Wk, the query features' scale) for a decoding step in one C call: one token per row at one
        position, no padding, no gradient, maps without bias, a state of `state_type`; else None."""
        if not isinstance(state, state_type) or q.shape[2] != 1 or mask is not None:
            return None
        wq, wk = self.feature_map_q.weight, self.feature_map_k.weight
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, wq, wk, self.window_logit)):
            return None
        if self.feature_map_q.bias is not None or self.feature_map_k.bias is not None:
            return None
        position = common_count(state.n, state.position)
        if position is None:
            return None
        return wq, wk, self._query_feature_scale(position)
