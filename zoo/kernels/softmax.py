"""Exact causal softmax attention through SDPA (never a materialized T x T score matrix on fused paths)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q: [B, H, T, D]; k, v: [B, Hkv, S, D] with S >= T, the last T keys aligned with the queries.

    key_mask: [B, S] (1 real, 0 padding) or None. Returns [B, H, T, D]. Query i sees keys up to
    S - T + i. A query with no visible real key (left padding) sees itself, so no row is empty.
    """
    T, S = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if key_mask is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if key_mask is None and T == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    rows = torch.arange(T, device=q.device)[:, None] + (S - T)
    cols = torch.arange(S, device=q.device)[None, :]
    allowed = (cols <= rows)[None, None]  # [1, 1, T, S]
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
        allowed = allowed | (cols == rows)[None, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
