"""The small passes of a Llama-family decoder layer between its matrix products, for a decoding step:

- `rms_norm(x, weight, eps)`: x [..., dim] -> weight * x / sqrt(mean(x^2) + eps), as transformers' RMS norm;
- `rotate_heads_(x, cos, sin)`: x [B, heads * dim] rotated in place by the rotary tables cos, sin [B, dim];
- `silu_mul_(gate, up)`: gate = silu(gate) * up in place (the MLP's act_fn(gate) * up).

On the CPU in fp32 with contiguous tensors each is one C call (csrc/decode_glue.c); elsewhere, where the
kernel does not build, or within zoo.kernels.native.disabled(): the PyTorch ops, with the same results
within float rounding.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from zoo.kernels import native

__all__ = ["rms_norm", "rotate_heads_", "silu_mul_"]

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def _fn(entry: str, argtypes: list):
    return native.function("decode_glue", entry, argtypes, restype=None)


def _in_c(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2, -1) + eps) for x [..., dim], weight [dim]; a new tensor."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    fn = _fn("zoo_rms_norm_f32", [_I64, _I64, _PTR, _PTR, ctypes.c_float, _PTR]) if _in_c(x, weight) else None
    if fn is None:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    out = torch.empty_like(x)
    dim = x.shape[-1]
    fn(x.numel() // dim, dim, x.data_ptr(), weight.data_ptr(), eps, out.data_ptr())
    return out


def rotate_heads_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads * dim] <- x * cos + rotate_half(x) * sin per head, in place; cos, sin [B, dim] (a row's
    tables, the first half's frequencies repeated as transformers makes them). Returns x."""
    B, dim = cos.shape
    heads = x.shape[-1] // dim
    if sin.shape != cos.shape or x.shape != (B, heads * dim) or dim % 2:
        raise ValueError(
            f"rotate_heads_: x {tuple(x.shape)} is not [B, heads * dim] for cos and sin [B, dim] = "
            f"{tuple(cos.shape)}, {tuple(sin.shape)} with an even dim"
        )
    fn = _fn("zoo_rotate_heads_f32", [_I64] * 3 + [_PTR] * 3) if _in_c(x, cos, sin) else None
    if fn is None:
        view = x.view(B, heads, dim)
        half = dim // 2
        rotated = torch.cat((-view[..., half:], view[..., :half]), -1)
        view.copy_(view * cos[:, None] + rotated * sin[:, None])
        return x
    fn(B, heads, dim, x.data_ptr(), cos.data_ptr(), sin.data_ptr())
    return x


def silu_mul_(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate <- silu(gate) * up in place (same shapes); returns gate."""
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul_: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    fn = _fn("zoo_silu_mul_f32", [_I64, _PTR, _PTR]) if _in_c(gate, up) else None
    if fn is None:
        return F.silu(gate, inplace=True).mul_(up)
    fn(gate.numel(), gate.data_ptr(), up.data_ptr())
    return gate
