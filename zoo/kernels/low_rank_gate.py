"""A per-feature log gate from a low-rank projection of the layer input, in the heads' layout (`gla`'s):

    log g[b, n, t, f] = logsigmoid(x_low[b, t] . W[n * F + f] + bias[n * F + f]) * scale

x_low [B, T, R] (the layer input projected down to rank R), W [H * F, R], bias [H * F]; the result
[B, H, T, F] fp32, contiguous, the layout the chunked kernels take.

On the CPU in fp32 the forward is one C pass (csrc/low_rank_gate.c) and so is the backward to the logits
(the logits recomputed, not stored: [T, H * F] values a token is the largest tensor of the layer), whose
products with x_low and W give their gradients. Elsewhere, where the kernel does not build, or within
zoo.kernels.native.disabled(): the PyTorch ops, in the same layout.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from zoo.kernels import native

__all__ = ["low_rank_log_gate"]

_SIZES = [ctypes.c_int64] * 5
_ARRAYS_IN = [ctypes.c_void_p] * 3


def _forward_fn():
    return native.function(
        "low_rank_gate",
        "zoo_low_rank_log_gate_f32",
        _SIZES + _ARRAYS_IN + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int],
    )


def _backward_fn():
    return native.function(
        "low_rank_gate",
        "zoo_low_rank_log_gate_backward_f32",
        _SIZES + _ARRAYS_IN + [ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int],
    )


def low_rank_log_gate(x_low, weight, bias, scale: float, heads: int) -> torch.Tensor:
    """See the module docstring: x_low [B, T, R], weight [H * F, R], bias [H * F] -> [B, H, T, F]."""
    tensors = (x_low, weight, bias)
    if (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and _forward_fn() is not None
    ):
        return _LowRankLogGate.apply(x_low, weight, bias, float(scale), heads)
    return _low_rank_log_gate_torch(x_low, weight, bias, scale, heads)


def _low_rank_log_gate_torch(x_low, weight, bias, scale, heads):
    B, T, R = x_low.shape
    w = weight.float().view(heads, -1, R)  # [H, F, R]
    logits = torch.matmul(x_low.float()[:, None], w.transpose(1, 2)) + bias.float().view(heads, 1, -1)
    return F.logsigmoid(logits) * scale


class _LowRankLogGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_low, weight, bias, scale, heads):
        B, T, R = x_low.shape
        x_low, wt, bias = x_low.contiguous(), weight.t().contiguous(), bias.contiguous()
        per_head = weight.shape[0] // heads
        out = x_low.new_empty(B, heads, T, per_head)
        sizes = (B, T, R, heads, per_head)
        if _forward_fn()(
            *sizes, x_low.data_ptr(), wt.data_ptr(), bias.data_ptr(), scale, out.data_ptr(), _threads()
        ):
            raise MemoryError("zoo's low-rank gate kernel could not allocate its scratch row")
        ctx.save_for_backward(x_low, weight, wt, bias)
        ctx.scale, ctx.sizes = scale, sizes
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x_low, weight, wt, bias = ctx.saved_tensors
        B, T, R, H, Fh = ctx.sizes
        dout = dout.contiguous()
        dlogits = x_low.new_empty(B, T, H * Fh)
        pointers = (x_low.data_ptr(), wt.data_ptr(), bias.data_ptr())
        if _backward_fn()(*ctx.sizes, *pointers, ctx.scale, dout.data_ptr(), dlogits.data_ptr(), _threads()):
            raise MemoryError("zoo's low-rank gate kernel could not allocate its scratch row")
        flat = dlogits.view(B * T, H * Fh)
        dx = (flat @ weight).view(B, T, R) if ctx.needs_input_grad[0] else None
        dw = flat.t() @ x_low.reshape(B * T, R) if ctx.needs_input_grad[1] else None
        db = flat.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None


def _threads() -> int:
    return torch.get_num_threads()
