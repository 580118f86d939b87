"""Small helpers shared by the kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_time(t: torch.Tensor | None, length: int, dim: int = 2) -> torch.Tensor | None:
    """Zero-pad `t` at the end of axis `dim` (the time axis) up to `length`. None stays None."""
    if t is None or t.shape[dim] == length:
        return t
    dim = dim % t.dim()
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, length - t.shape[dim]]
    return F.pad(t, pad)


def repeat_heads(t: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """[B, h, ...] -> [B, h * groups, ...], each head repeated `groups` times in place (as repeat_kv)."""
    return None if t is None else t.repeat_interleave(groups, dim=1)


def group_heads(t: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """The inverse of `repeat_heads` for heads that come in runs of `groups` identical ones: the first of
    each run, in memory of its own (a strided view would keep the repeated tensor alive)."""
    if t is None:
        return None
    if t.shape[1] % groups:
        raise ValueError(f"a state of {t.shape[1]} heads does not split into groups of {groups}")
    return t[:, ::groups].contiguous()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def lower_triangle(n: int, device: torch.device, diagonal: int = 0) -> torch.Tensor:
    """[n, n] bool mask, True where column j <= row i + diagonal (diagonal=0 keeps the diagonal)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril(diagonal)


def same_objects(xs, ys) -> bool:
    """Whether xs and ys are both None, or hold the very same objects in order (a decoding step bound to a
    layer's weight tensors asks whether it is handed those tensors again)."""
    if xs is None or ys is None:
        return xs is ys
    return len(xs) == len(ys) and all(x is y for x, y in zip(xs, ys))
