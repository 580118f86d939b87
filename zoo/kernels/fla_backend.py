"""flash-linear-attention (`fla`, PyPI `flash-linear-attention`) ops behind zoo's kernel contracts.

Adapters with the signatures and results of zoo.kernels.linear_attention.linear_attention and
zoo.kernels.delta_rule.delta_rule: layouts [B, H, T, D] (fla: [B, T, H, D]), log gates <= 0 (fla
takes natural-log gates as well), states in fp32 ([B, H, Dk, Dv], fla's default layout).

- Linear attention: no gate or a scalar gate per head -> fla's simple GLA; a gate per key dimension
  -> fla's GLA. The normalizer rides along as an extra value column of ones (y = num / (den + eps),
  z = the state's last column), as in zoo's own chunked form. Our q are feature maps, unscaled:
  fla's `scale` is 1.
- Delta rule: fla's delta rule (no gate) or gated delta rule (scalar gate per head); fla's update is
  ours: S_t = g_t S_{t-1} + beta_t k_t (v_t - g_t S_{t-1}^T k_t)^T.

Modes: "chunk" (training / prefill; fla's chunked kernels) and "recurrent" (fla's fused recurrent
kernels: decoding, and the ones Triton's CPU interpreter can run). Known fla limits, checked here with
clear errors: the chunked delta rule takes no float32, the fused recurrent gated delta rule has no
backward pass. q, k and v are cast to one dtype (fla wants them alike); outputs come back in v's dtype.

fla is imported on first use only, so zoo works (and imports fast) without it.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from zoo.kernels.linear_attention import LinearAttentionState

MODES = ("chunk", "recurrent")
#: fla's kernels hold a whole key (feature) vector per program: larger key dimensions are not taken
MAX_KEY_DIM = 256


def fla_installed() -> bool:
    """Is `fla` importable (without importing it)?"""
    return importlib.util.find_spec("fla") is not None


def _fla_ops():
    try:
        import fla.ops as ops
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the fla backend needs flash-linear-attention: pip install flash-linear-attention"
        ) from e
    return ops


def _to_fla(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, H, T, ...] -> [B, T, H, ...], contiguous (and cast)."""
    x = x.transpose(1, 2)
    return (x if dtype is None else x.to(dtype)).contiguous()


def _common_dtype(*xs: torch.Tensor) -> torch.dtype:
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def linear_attention_fla(q, k, v, log_gate=None, state=None, normalize=False, eps=1e-6, *, mode="chunk"):
    """zoo.kernels.linear_attention.linear_attention on fla: q, k [B, H, T, Dk], v [B, H, T, Dv],
    log_gate None / [B, H, T] / [B, H, T, Dk], state a LinearAttentionState or None. Returns y [B, H, T, Dv]
    (v's dtype) and the new LinearAttentionState (fp32)."""
    _check_mode(mode)
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"expected q, k [B, H, T, Dk] and v [B, H, T, Dv]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if log_gate is not None and log_gate.shape not in (q.shape[:3], q.shape):
        raise ValueError(f"log_gate must be [B, H, T] or [B, H, T, Dk]; got {tuple(log_gate.shape)}")
    if normalize and state is not None and state.z is None:
        raise ValueError("normalize=True needs a state with its normalizer z (it was made without)")
    ops = _fla_ops()
    dtype = _common_dtype(q, k, v)
    Dv = v.shape[-1]
    values = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1) if normalize else v
    S0 = None
    if state is not None:
        S0 = torch.cat([state.S, state.z[..., None]], dim=-1) if normalize else state.S
        S0 = S0.float().contiguous()
    args = (_to_fla(q, dtype), _to_fla(k, dtype), _to_fla(values, dtype))
    common = dict(scale=1.0, initial_state=S0, output_final_state=True)
    if log_gate is not None and log_gate.dim() == 4:  # one gate per key dimension: GLA
        g = _to_fla(log_gate, torch.float32)
        if mode == "chunk":
            y, S = ops.chunk_gla(*args, g, **common)
        else:
            y, S = ops.fused_recurrent_gla(*args, gk=g, **common)
    else:  # none or one per head: simple GLA
        g = None if log_gate is None else _to_fla(log_gate, torch.float32)
        fn = ops.chunk_simple_gla if mode == "chunk" else ops.fused_recurrent_simple_gla
        y, S = fn(*args, g=g, **common)
    y = y.transpose(1, 2).float()
    if normalize:
        y = y[..., :Dv] / (y[..., Dv:] + eps)
        return y.to(v.dtype), LinearAttentionState(S[..., :Dv].float(), S[..., Dv].float())
    return y.to(v.dtype), LinearAttentionState(S.float(), None)


#: fla refuses the backward of its gated chunked kernels (chunk_bwd_dqkwg with a gate) on Hopper GPUs under
#: Triton >= 3.4.0 and < 3.7.1, which compute wrong gradients there (fla issue #640), unless tilelang is
#: installed. Seen on an H100 with the Triton 3.6.0 that CUDA torch 2.11 pins: gated-delta, mamba2 and
#: retention training stopped with fla's error. Such calls take the PyTorch forms instead.
BROKEN_GATED_BACKWARD_TRITON = ("3.4.0", "3.7.1")


def gated_chunk_backward_refused(capability: tuple[int, int], triton_version: str, tilelang: bool) -> bool:
    """Does fla refuse the gated chunked backward on a GPU of this compute capability with this Triton?"""
    from packaging.version import Version

    low, high = (Version(v) for v in BROKEN_GATED_BACKWARD_TRITON)
    return capability[0] == 9 and low <= Version(triton_version) < high and not tilelang


@functools.cache
def gated_chunk_backward_works(device: torch.device) -> bool:
    """Can fla's gated chunked kernels be trained through on `device` here? (Only CUDA devices can fail.)"""
    if device.type != "cuda":
        return True
    import triton

    return not gated_chunk_backward_refused(
        torch.cuda.get_device_capability(device),
        triton.__version__,
        importlib.util.find_spec("tilelang") is not None,
    )


def delta_rule_mode_supported(mode: str, dtype: torch.dtype, gated: bool, needs_grad: bool) -> str | None:
    """None if fla's delta-rule kernels of `mode` take these inputs, else why not."""
    if mode == "chunk" and not gated and dtype == torch.float32:
        return "fla's chunked delta rule takes no float32 (bfloat16 or float16 only)"
    if mode == "recurrent" and gated and needs_grad:
        return "fla's fused recurrent gated delta rule has no backward pass"
    return None


def delta_rule_fla(q, k, v, beta, log_gate=None, state=None, *, mode="chunk"):
    """zoo.kernels.delta_rule.delta_rule on fla: q, k [B, H, T, Dk] (k L2-normalized), v [B, H, T, Dv],
    beta [B, H, T], log_gate None or [B, H, T], state [B, H, Dk, Dv] or None. Returns y (v's dtype) and
    the new state [B, H, Dk, Dv] fp32."""
    _check_mode(mode)
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3] or beta.shape != q.shape[:3]:
        raise ValueError(
            f"expected q, k [B, H, T, Dk], v [B, H, T, Dv], beta [B, H, T]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(beta.shape)}"
        )
    if log_gate is not None and log_gate.shape != q.shape[:3]:
        raise ValueError(f"log_gate must be [B, H, T]; got {tuple(log_gate.shape)}")
    dtype = _common_dtype(q, k, v)
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, beta, log_gate, state)
    )
    why = delta_rule_mode_supported(mode, dtype, log_gate is not None, needs_grad)
    if why:
        raise ValueError(why)
    ops = _fla_ops()
    S0 = None if state is None else state.float().contiguous()
    if S0 is not None and needs_grad and not S0.requires_grad and mode == "recurrent":
        # fla 0.6's fused recurrent backward writes the initial state's gradient whenever there is an
        # initial state: give it one to write (a detached leaf; the gradient is dropped)
        S0 = S0.detach().requires_grad_()
    args = (_to_fla(q, dtype), _to_fla(k, dtype), _to_fla(v, dtype))
    b = _to_fla(beta, dtype)
    common = dict(scale=1.0, initial_state=S0, output_final_state=True)
    if log_gate is None:
        fn = ops.chunk_delta_rule if mode == "chunk" else ops.fused_recurrent_delta_rule
        y, S = fn(*args, b, **common)
    else:
        g = _to_fla(log_gate, torch.float32)
        if mode == "chunk":
            y, S = ops.chunk_gated_delta_rule(*args, g, b, **common)
        else:
            y, S = ops.fused_recurrent_gated_delta_rule(*args, g=g, beta=b, **common)
    return y.transpose(1, 2).to(v.dtype), S.float()
