"""Triton kernels for the GPU (and for Triton's CPU interpreter, `TRITON_INTERPRET=1`, in the tests).

- `window_hybrid`: the fused sliding-window softmax + linear attention hybrid (LoLCATs), forward and
  backward (an autograd Function), plain and terraced window, with the O(W) `WindowHybridState` in
  and out; its kernels are in `hybrid_kernels`, the fused decoding step in `hybrid_step`.
- `chunk_states`: prefix / suffix sums of per-chunk outer products (the linear-attention state at
  chunk boundaries), shared by the hybrid's forward and backward passes.
- `compile_check`: builds every kernel for a CUDA architecture without a GPU (a CI check).

Nothing here imports triton until a kernel module is imported, so `import zoo` stays light and works
without triton. Kernel modules must be imported *after* TRITON_INTERPRET is set for the interpreter
to take effect (triton reads it when a kernel is decorated).
"""

from __future__ import annotations

import importlib.util
import os


def triton_installed() -> bool:
    """Is the `triton` package importable (without importing it)?"""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Does TRITON_INTERPRET ask for Triton's CPU interpreter (kernels then run on CPU tensors)?"""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
