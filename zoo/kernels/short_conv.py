"""A short causal depthwise convolution over time that skips padding and carries its history.

Mamba2's and Gated DeltaNet's short convolutions (a few taps per channel, before the recurrence) use
it. The history, the last K-1 real inputs, is part of a mixer's state, so a sequence split anywhere
gives the same outputs as the whole.
"""

from __future__ import annotations

import torch

__all__ = ["causal_conv"]


def causal_conv(
    x: torch.Tensor, weight: torch.Tensor, history: torch.Tensor, mask: torch.Tensor | None = None
):
    """Depthwise causal conv. x [B, h, T, D], weight [h, D, K] (tap K-1 reads the current token),
    history [B, h, K-1, D] (the previous K-1 real inputs); mask [B, T] or None. Padded inputs are
    skipped: each real token sees the K-1 real tokens before it. Returns the output [B, h, T, D] (0 at
    padding) and the new history."""
    K = weight.shape[-1]
    ext = torch.cat([history.to(x.dtype), x], dim=2)  # [B, h, K-1+T, D]
    B, h, N, D = ext.shape
    if mask is not None:
        valid = torch.cat([mask.new_ones(B, K - 1), mask], dim=1).bool()  # [B, N]
        # move real tokens to the front of each row, in order, so a plain causal conv skips the padding
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
        ext = ext.gather(2, order[:, None, :, None].expand(B, h, N, D))
        rank = valid.long().cumsum(1) - 1  # compact index of each real token
        count = valid.sum(1)
    win = ext.unfold(2, K, 1)  # [B, h, N-K+1, D, K]: window ending at each position
    out = (win * weight[None, :, None]).sum(-1)
    if mask is None:
        return out, ext[:, :, N - K + 1 :]
    idx = (rank[:, K - 1 :] - (K - 1)).clamp(min=0)  # [B, T]
    out = out.gather(2, idx[:, None, :, None].expand(B, h, -1, D)) * mask[:, None, :, None]
    last = (count[:, None] - K + 1 + torch.arange(K - 1, device=x.device)).clamp(min=0)
    return out, ext.gather(2, last[:, None, :, None].expand(B, h, K - 1, D))
