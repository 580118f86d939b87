"""What the wrappers of zoo's one-token C steps (zoo.kernels.linear_step, zoo.kernels.delta_step) share:
whether tensors can go to C as they are, and their pointers."""

from __future__ import annotations

import torch

__all__ = ["cpu_fp32_without_grad", "pointer"]


def cpu_fp32_without_grad(*tensors: torch.Tensor | None) -> bool:
    """Every tensor given (None skipped) is fp32 on the CPU, and none has a gradient to take."""
    given = [t for t in tensors if t is not None]
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in given):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in given))


def pointer(t: torch.Tensor | None) -> int | None:
    """The address of t's data for a C call (t contiguous), or None (NULL) for no tensor."""
    return None if t is None else t.data_ptr()
