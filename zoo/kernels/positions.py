"""Token positions: where each token of a call sits in its sequence, counting real tokens only.

A call (a training forward, a prefill, one decoding step) holds T tokens of each sequence; `seen` real
tokens came before it, and padding (mask 0) does not count, so left padding never shifts a position.
Every mixer and kernel that needs positions takes them from here.
"""

from __future__ import annotations

import torch


def token_positions(
    seen: torch.Tensor | int, mask: torch.Tensor | None, T: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """[B, T] int64: the position of each token of a call within its sequence (0 for the first real token).

    seen: [B] int64 (or one int for every row), the real tokens before this call, as a state counts them.
    mask: [B, T], 1 (or True) for real tokens, 0 for padding; None: all real. A padded token does not advance
    the count: it gets the position of the real token before it (seen - 1 before any), so only the positions
    of real tokens mean anything. With an int `seen` and no mask the result is [1, T] (it broadcasts);
    `device` is used only then.
    """
    if mask is None:
        if isinstance(seen, torch.Tensor):
            return seen[:, None] + torch.arange(T, device=seen.device)
        return seen + torch.arange(T, device=device)[None, :]
    if mask.shape[1] != T:
        raise ValueError(f"mask must be [B, T] with T = {T}, got {tuple(mask.shape)}")
    counts = mask.bool().long().cumsum(1)
    seen = seen[:, None] if isinstance(seen, torch.Tensor) else seen
    return seen + counts - 1


def common_count(n: torch.Tensor, known: int | None = None) -> int | None:
    """The one value of n [B] (tokens seen) where every row has it, else None; `known`: that value where the
    caller carries it already (a decoding state does), returned without reading the tensor."""
    if known is not None:
        return known
    low, high = (int(x) for x in torch.aminmax(n))
    return low if low == high else None


def tokens_after(seen: torch.Tensor | int, mask: torch.Tensor | None, T: int) -> torch.Tensor | int:
    """The real tokens seen after a call of T tokens ([B] int64, or an int when `seen` is one and no mask)."""
    return seen + (T if mask is None else mask.bool().sum(1))
