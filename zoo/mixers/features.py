"""Feature maps phi shared by the mixers, and the head-wise projection most of them start from.

Each map takes [..., d] and returns non-negative fp32 features [..., F]; which mixers use which:
- `hedgehog_features`: [softmax(h), softmax(-h)] (F = 2d) of a learned projection h: hedgehog, lolcats,
  gla, mamba2 (its C and B), delta's "hedgehog" activation.
- `softmax_features`: softmax(x) over the head dimension (F = d), no parameters: liger-gla, liger, retention.
- `taylor_features`: Based's 2nd-order Taylor map (F = 1 + d + d(d+1)/2): based, based-window.
"""

from __future__ import annotations

import ctypes
import math

import torch
from torch import nn

from zoo.kernels import native


class HeadwiseLinear(nn.Module):
    """x [B, h, T, D] -> x @ W_h (+ b_h): one [D, F] map per head, computed in fp32.

    init "identity": W_h = I (rectangular when F != D). "signed": column f is +-e_(f mod D), the sign
    flipping every D columns, so that relu features start as relu(x), relu(-x), ... and none is dead.
    Given more heads than it holds (a query map tied to a key map under GQA), each map serves its group.
    """

    def __init__(self, heads: int, in_dim: int, out_dim: int, bias: bool = False, init: str = "identity"):
        super().__init__()
        f = torch.arange(out_dim)
        w = torch.zeros(in_dim, out_dim)
        if init == "identity":
            n = min(in_dim, out_dim)
            w[:n, :n] = torch.eye(n)
        elif init == "signed":
            w[f % in_dim, f] = 1.0 - 2.0 * ((f // in_dim) % 2)
        else:
            raise ValueError(f"unknown init {init!r}")
        self.weight = nn.Parameter(w.expand(heads, in_dim, out_dim).clone())
        self.bias = nn.Parameter(torch.zeros(heads, 1, out_dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.float(), None if self.bias is None else self.bias.float()
        if x.shape[1] != w.shape[0]:
            w = w.repeat_interleave(x.shape[1] // w.shape[0], dim=0)
            b = None if b is None else b.repeat_interleave(x.shape[1] // b.shape[0], dim=0)
        y = x.float() @ w
        return y if b is None else y + b


def hedgehog_features(h: torch.Tensor) -> torch.Tensor:
    """[..., F] projections -> [..., 2F] features: softmax over the features of h and of -h, in fp32. On the
    CPU in fp32 it is one C pass forward and one backward (zoo/kernels/csrc/hedgehog_rows.c) where that
    kernel builds; otherwise, or within zoo.kernels.native.disabled(), the PyTorch ops."""
    if _rows_fit(h) and _hedgehog_rows_fn("zoo_hedgehog_rows_f32") is not None:
        return _HedgehogRows.apply(h)
    h = h.float()
    return torch.cat([torch.softmax(h, dim=-1), torch.softmax(-h, dim=-1)], dim=-1)


def _rows_fit(h: torch.Tensor) -> bool:
    return h.device.type == "cpu" and h.dtype == torch.float32 and h.dim() > 0 and h.numel() > 0


def _hedgehog_rows_fn(entry: str):
    sizes = [ctypes.c_int64, ctypes.c_int64]
    arrays = [ctypes.c_void_p] * (2 if entry == "zoo_hedgehog_rows_f32" else 3)
    return native.function("hedgehog_rows", entry, sizes + arrays + [ctypes.c_int], restype=None)


class _HedgehogRows(torch.autograd.Function):
    """hedgehog_features in C: h [..., F] -> [..., 2F]; the backward from the saved features."""

    @staticmethod
    def forward(ctx, h):
        h = h.contiguous()
        F = h.shape[-1]
        out = h.new_empty(*h.shape[:-1], 2 * F)
        _hedgehog_rows_fn("zoo_hedgehog_rows_f32")(
            h.numel() // F, F, h.data_ptr(), out.data_ptr(), torch.get_num_threads()
        )
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        (out,) = ctx.saved_tensors
        dout = dout.contiguous()
        F = out.shape[-1] // 2
        dh = out.new_empty(*out.shape[:-1], F)
        _hedgehog_rows_fn("zoo_hedgehog_rows_backward_f32")(
            dh.numel() // F, F, out.data_ptr(), dout.data_ptr(), dh.data_ptr(), torch.get_num_threads()
        )
        return dh


def hedgehog_of(linear: HeadwiseLinear, x: torch.Tensor) -> torch.Tensor:
    """hedgehog_features(linear(x)): x [B, n, T, D] -> [B, n, T, 2F]. One token per row in fp32 on the CPU,
    without gradients (decoding), it is one C call (zoo/kernels/csrc/hedgehog_features.c) where that
    kernel builds; otherwise, or within zoo.kernels.native.disabled(), the PyTorch ops."""
    fused = _hedgehog_one_token(linear, x)
    return fused if fused is not None else hedgehog_features(linear(x))


def _hedgehog_one_token(linear: HeadwiseLinear, x: torch.Tensor) -> torch.Tensor | None:
    w = linear.weight
    if (
        x.device.type != "cpu"
        or x.dim() != 4
        or x.shape[2] != 1
        or linear.bias is not None
        or x.dtype != torch.float32
        or w.dtype != torch.float32
        or x.shape[1] != w.shape[0]
        or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    ):
        return None
    argtypes = [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 3
    fn = native.function("hedgehog_features", "zoo_hedgehog_features_f32", argtypes, restype=None)
    if fn is None:
        return None
    B, n, _, D = x.shape
    F2 = w.shape[-1]
    x, w = x.contiguous(), w.contiguous()
    out = x.new_empty(B, n, 1, 2 * F2)
    fn(B, n, D, F2, x.data_ptr(), w.data_ptr(), out.data_ptr())
    return out


def softmax_features(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = softmax(x) over the head dimension, fp32: [..., D] -> [..., D]."""
    return torch.softmax(x.float(), dim=-1)


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., 1 + d + d(d+1)/2] with phi(x) . phi(y) = 1 + x.y/sqrt(d) + (x.y)^2/(2d); fp32.

    The outer product is stored once per unordered pair (the diagonal, then sqrt(2) x_i x_j for i < j): the
    same dot product as 1 + d + d^2 features."""
    x = x.float()
    d = x.shape[-1]
    i, j = torch.triu_indices(d, d, device=x.device)
    pair = x[..., i] * x[..., j] * torch.where(i == j, 1.0, math.sqrt(2.0)).to(x.device)
    return torch.cat([torch.ones_like(x[..., :1]), x * d**-0.25, pair / math.sqrt(2.0 * d)], dim=-1)


def num_taylor_features(d: int) -> int:
    """Features of `taylor_features` for a d-dim input: 1 + d + d(d+1)/2."""
    return 1 + d + d * (d + 1) // 2
