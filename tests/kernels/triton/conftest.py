"""Triton tests run on a GPU when there is one, else on the CPU through Triton's interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU, before anything imports triton (it is
read when triton.language is imported and when each kernel is decorated). Here: a clear error if
triton was imported before that anyway, and, under the interpreter, autotuned kernels (fla's) keep
their first config, since the interpreter has no GPU to time configurations on.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    try:
        import triton.language as tl
        import triton.runtime.autotuner as autotuner
        from triton.runtime.jit import JITFunction
    except ImportError:  # no triton: every test here skips (importorskip in the modules)
        pass
    else:
        if isinstance(tl.sum, JITFunction):
            raise pytest.UsageError(
                "triton was imported before TRITON_INTERPRET=1 was set (see tests/conftest.py): "
                "its kernels cannot run on the CPU in this process"
            )
        autotuner.Autotuner.prune_configs = lambda self, kwargs: self.configs[:1]


@pytest.fixture(autouse=True)
def one_thread_for_tiny_tensors():
    """The interpreter runs numpy on tiny tiles: intra-op threads only add barrier waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
