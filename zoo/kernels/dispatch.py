"""Dispatch: run each kernel operation on the fastest path available for its device and dtype.

Backends:
- "torch": the PyTorch forms (zoo.kernels.linear_attention, delta_rule, window_hybrid): always there;
  the path on the CPU and on every device without a faster one.
- "triton": zoo's own Triton kernels (zoo.kernels.triton): the window hybrid. On CUDA when triton is
  importable; on the CPU only through Triton's interpreter (TRITON_INTERPRET=1, for tests), never
  chosen automatically there.
- "fla": flash-linear-attention's ops (zoo.kernels.fla_backend): gated linear attention and the
  (gated) delta rule. On CUDA when fla is importable.
- "flex": FlexAttention (zoo.kernels.flex_window) for the window hybrid when it is window softmax alone
  (b = 0, as in `liger`'s window branch), prefill only. An option: never chosen automatically (it
  comes after triton, which it needs on CUDA to compile); usable on the CPU too (eager, for tests).

On torch, the window hybrid's decoding of one token per row without padding (what `generate` does after
the prompt) takes zoo.kernels.window_decode, a few operations with the grouped heads in place.

Automatic choice: on CUDA, the first available of the operation's fast backends whose limits the
inputs meet (the window hybrid's fused kernels take no padding; fla's chunked delta rule no float32),
else torch. The environment variable ZOO_KERNEL_BACKEND = torch | triton | fla | flex forces a backend
(auto or unset: automatic; anything else is an error): an operation that backend implements runs on it,
or raises if the backend is not available on the tensors' device; one it does not implement (or
inputs outside its limits) runs on torch. A `backend=` argument does the same per call.
`backend_for` says which path a call takes; `available_backends(device)` lists the native ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from zoo.cpu_memory import ensure_cpu_allocator
from zoo.kernels import delta_rule as torch_delta
from zoo.kernels import linear_attention as torch_linear
from zoo.kernels import window_hybrid as torch_hybrid
from zoo.kernels.delta_step import delta_step_in_c
from zoo.kernels.fla_backend import (
    MAX_KEY_DIM,
    delta_rule_mode_supported,
    fla_installed,
    gated_chunk_backward_works,
)
from zoo.kernels.flex_window import flex_available, flex_fits, is_window_only
from zoo.kernels.linear_step import linear_step_in_c
from zoo.kernels.triton import interpreter_enabled, triton_installed
from zoo.kernels.window_decode import decode_fits, hedgehog_window_decode, window_hybrid_decode

ENV_VAR = "ZOO_KERNEL_BACKEND"
BACKENDS = ("torch", "triton", "fla", "flex")
#: the fast backends of each operation, in order of preference (torch is every operation's fallback)
FAST_BACKENDS = {"window_hybrid": ("triton", "flex"), "linear_attention": ("fla",), "delta_rule": ("fla",)}
#: up to this many new tokens after a state, the window hybrid takes the recurrent step form
STEP_MAX_TOKENS = 4
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def requested_backend(backend: str | None = None) -> str | None:
    """The forced backend: `backend` if given, else ZOO_KERNEL_BACKEND; None for automatic."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "")
    name = name.strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKENDS:
        source = "backend=" if backend is not None else f"{ENV_VAR}="
        raise ValueError(
            f"{source}{name!r} is not a kernel backend; choose one of {', '.join(BACKENDS)} or auto"
        )
    return name


def _usable(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "triton":
        return triton_installed() and (
            device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())
        )
    if name == "flex":
        return flex_available() and (device.type == "cpu" or (device.type == "cuda" and triton_installed()))
    return device.type == "cuda" and fla_installed() and triton_installed()


def available_backends(device: torch.device | str | None = None, include_emulated: bool = False) -> list[str]:
    """The backends that run natively on `device` (default: CUDA if present, else the CPU), torch first:
    what is worth timing there. include_emulated adds those that only run for tests on the CPU (Triton
    through its interpreter, FlexAttention eagerly and forward-only); any listed backend can be forced."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return [
        name
        for name in BACKENDS
        if _usable(name, device) and (include_emulated or name == "torch" or device.type == "cuda")
    ]


def backend_for(
    op: str, device: torch.device | str, backend: str | None = None, fits: Callable[[str], bool] | None = None
) -> str:
    """The backend that runs `op` on `device`. fits(name) says whether the call's inputs meet that
    backend's limits (asked only about the backend that would run; default: they do)."""
    if op not in FAST_BACKENDS:
        raise ValueError(f"unknown operation {op!r}; known: {', '.join(FAST_BACKENDS)}")
    device = torch.device(device)
    if device.type == "cpu":  # the chunked forms allocate large temporaries: see zoo.cpu_memory
        ensure_cpu_allocator()
    fits = fits or (lambda name: True)
    forced = requested_backend(backend)
    if forced is not None:
        if forced not in FAST_BACKENDS[op]:
            return "torch"
        if not _usable(forced, device):
            hint = " (Triton runs on the CPU only with TRITON_INTERPRET=1)" if forced == "triton" else ""
            raise RuntimeError(
                f"kernel backend {forced!r} was asked for ({ENV_VAR} or backend=) but is not "
                f"available on {device}; available there: {', '.join(available_backends(device, True))}{hint}"
            )
        return forced if fits(forced) else "torch"
    if device.type != "cuda":
        return "torch"
    for name in FAST_BACKENDS[op]:
        if _usable(name, device) and fits(name):
            return name
    return "torch"


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs)


def _gated_chunk_backward_refused(mode: str, log_gate, *inputs) -> bool:
    """Would fla refuse to train through this gated chunked call on its device (see fla_backend)?"""
    if mode != "chunk" or log_gate is None or not _needs_grad(*inputs):
        return False
    return not gated_chunk_backward_works(log_gate.device)


# ---------------------------------------------------------------------------------------------------


def window_hybrid(
    q,
    k,
    v,
    fq,
    fk,
    a,
    b,
    *,
    window=64,
    terraced=False,
    scale=None,
    state=None,
    key_mask=None,
    c=None,
    chunk_size=None,
    step_max_tokens=STEP_MAX_TOKENS,
    backend=None,
    kv_groups=1,
    sinks=0,
):
    """zoo.kernels.window_hybrid.window_hybrid on the chosen backend (same arguments and results).
    `chunk_size` applies to the PyTorch form only; the Triton kernels pick their own tiles. Attention
    sinks (`sinks` > 0) run on Triton and PyTorch (not on FlexAttention); the window 0 of a sinks-only
    softmax on PyTorch only.

    `kv_groups` > 1 (grouped-query attention): k, v and fk come either once per key/value head
    ([B, H / kv_groups, T, *], which the Triton kernels read in place) or repeated to the H query heads;
    the state is kept once per key/value head either way (see `_state_per_kv_head`)."""
    H, HK = q.shape[1], k.shape[1]
    if kv_groups < 1 or H % kv_groups or HK not in (H, H // kv_groups):
        raise ValueError(
            f"kv_groups={kv_groups} with {H} query heads: k, v and fk need {H} heads (repeated) or "
            f"{H // max(kv_groups, 1)} (one per key/value head), got {HK}"
        )
    T = q.shape[2]
    decoding = state is not None and T <= step_max_tokens and not _needs_grad(q, k, v, fq, fk, a, b, c)

    def fits(name):  # the fused prefill kernels take no padding; the Triton step kernel does
        if not (all(x.dtype in _FUSED_DTYPES for x in (q, k, v, fq, fk)) and T > 0) or window < 1:
            return False
        if name == "flex" and (  # window softmax alone, prefill, no sinks, no CPU backward
            sinks
            or decoding
            or not is_window_only(a, b, c)
            or not flex_fits(q.device, q.shape[-1], v.shape[-1])
            or (q.device.type == "cpu" and _needs_grad(q, k, v, a))
        ):
            return False
        return decoding or key_mask is None or bool(key_mask.bool().all())

    chosen = backend_for("window_hybrid", q.device, backend, fits)
    options = dict(window=window, terraced=terraced, scale=scale, key_mask=key_mask, c=c)
    if chosen == "triton":  # one key/value head per group, read in place; the state as it is kept
        from zoo.kernels.triton.window_hybrid import window_hybrid_step_triton, window_hybrid_triton

        k, v, fk = _one_per_group(kv_groups, H, k, v, fk)
        fn = window_hybrid_step_triton if decoding else window_hybrid_triton
        return fn(q, k, v, fq, fk, a, b, state=state, sinks=sinks, **options)
    if chosen == "torch" and decoding and decode_fits(state, key_mask, T, sinks):  # generate's every token
        k, v, fk = _one_per_group(kv_groups, H, k, v, fk)
        return window_hybrid_decode(
            q, k, v, fq, fk, a, b, state=state, scale=scale, c=c, window=window, terraced=terraced
        )
    if HK != H:
        k, v, fk = (x.repeat_interleave(kv_groups, dim=1) for x in (k, v, fk))

    def per_head(st):
        if chosen == "flex":
            from zoo.kernels.flex_window import window_softmax_flex

            return window_softmax_flex(q, k, v, fk, window=window, terraced=terraced, scale=scale, state=st)
        return torch_hybrid.window_hybrid(
            q,
            k,
            v,
            fq,
            fk,
            a,
            b,
            state=st,
            chunk_size=chunk_size,
            step_max_tokens=step_max_tokens,
            sinks=sinks,
            **options,
        )

    return per_head(state) if kv_groups == 1 else _state_per_kv_head(kv_groups, state, per_head)


def hedgehog_window_hybrid_step(q, k, v, wq, wk, a, b, *, state, fq_scale=1.0, **options):
    """A window hybrid's decoding step with Hedgehog feature maps (wq [H, D, F/2], wk [HKV, D, F/2]),
    features included, as one C call (zoo.kernels.window_decode.hedgehog_window_decode), where the
    PyTorch backend is the one chosen for the call and that step applies; else None, and the caller
    computes the features and calls `window_hybrid`. `options`: window, terraced, scale, c, sinks."""
    if backend_for("window_hybrid", q.device) != "torch":
        return None
    return hedgehog_window_decode(q, k, v, wq, wk, a, b, state=state, fq_scale=fq_scale, **options)


def _one_per_group(kv_groups: int, H: int, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tensors given repeated to the H query heads -> one head per group of `kv_groups` (a view);
    tensors already given once per key/value head are returned as they are."""
    if kv_groups == 1 or xs[0].shape[1] != H:
        return xs
    return tuple(x[:, ::kv_groups] for x in xs)


def _state_per_kv_head(kv_groups: int, state, call):
    """`kv_groups` > 1: the caller's keys, values (and key features, gates) are repeated for grouped-query
    attention, so the heads come in runs of `kv_groups` with the same keys and the same state. That state
    is kept once per run ([B, H / kv_groups, ...]: a KV head's worth, like the teacher's KV cache) and
    repeated for the kernels: `call(repeated state or None)` -> (y, new state), the new state grouped."""
    y, new = call(None if state is None else state.repeat_heads(kv_groups))
    return y, new.group_heads(kv_groups)


def linear_attention(
    q, k, v, log_gate=None, state=None, normalize=False, eps=1e-6, chunk_size=64, backend=None, kv_groups=1
):
    """zoo.kernels.linear_attention.linear_attention on the chosen backend (same arguments and results);
    `kv_groups`: see `_state_per_kv_head`. One token on the CPU in fp32 without a gradient: one C call
    (zoo.kernels.linear_step), the state kept per key/value head as it is."""
    if q.shape[2] == 1 and backend_for("linear_attention", q.device, backend) == "torch":
        stepped = linear_step_in_c(q, k, v, log_gate, state, normalize, eps, kv_groups)
        if stepped is not None:
            return stepped
    if kv_groups > 1:
        return _state_per_kv_head(
            kv_groups,
            state,
            lambda st: linear_attention(q, k, v, log_gate, st, normalize, eps, chunk_size, backend),
        )

    mode = "recurrent" if q.shape[2] <= torch_linear.STEP_THRESHOLD else "chunk"

    def fits(name):
        if not (
            all(x.dtype in _FUSED_DTYPES for x in (q, k, v)) and q.shape[2] > 0 and q.shape[-1] <= MAX_KEY_DIM
        ):
            return False
        return not _gated_chunk_backward_refused(mode, log_gate, q, k, v, log_gate, state)

    if backend_for("linear_attention", q.device, backend, fits) == "fla":
        from zoo.kernels.fla_backend import linear_attention_fla

        return linear_attention_fla(q, k, v, log_gate, state, normalize, eps, mode=mode)
    return torch_linear.linear_attention(q, k, v, log_gate, state, normalize, eps, chunk_size)


def _delta_mode(q, k, v, beta, log_gate, state) -> tuple[str, str | None]:
    """fla's mode for these inputs (fused recurrent for a few tokens where it serves, else chunked) and
    why fla cannot take them (None if it can)."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if dtype not in _FUSED_DTYPES or q.shape[2] == 0 or q.shape[-1] > MAX_KEY_DIM:
        return "chunk", f"no fla delta rule for {dtype}, empty inputs or keys wider than {MAX_KEY_DIM}"
    gated, grad = log_gate is not None, _needs_grad(q, k, v, beta, log_gate, state)
    if (
        q.shape[2] <= torch_delta.STEP_THRESHOLD
        and delta_rule_mode_supported("recurrent", dtype, gated, grad) is None
    ):
        return "recurrent", None
    if _gated_chunk_backward_refused("chunk", log_gate, q, k, v, beta, log_gate, state):
        return "chunk", "fla refuses the gated chunked backward on this GPU with this Triton (fla issue #640)"
    return "chunk", delta_rule_mode_supported("chunk", dtype, gated, grad)


def delta_rule(q, k, v, beta, log_gate=None, state=None, chunk_size=None, backend=None):
    """zoo.kernels.delta_rule.delta_rule on the chosen backend (same arguments and results). One token on
    the CPU in fp32 without a gradient: one C call (zoo.kernels.delta_step)."""
    if q.shape[2] == 1 and backend_for("delta_rule", q.device, backend) == "torch":
        stepped = delta_step_in_c(q, k, v, beta, log_gate, state)
        if stepped is not None:
            return stepped
    if (
        backend_for(
            "delta_rule",
            q.device,
            backend,
            lambda name: _delta_mode(q, k, v, beta, log_gate, state)[1] is None,
        )
        == "fla"
    ):
        from zoo.kernels.fla_backend import delta_rule_fla

        return delta_rule_fla(
            q, k, v, beta, log_gate, state, mode=_delta_mode(q, k, v, beta, log_gate, state)[0]
        )
    return torch_delta.delta_rule(q, k, v, beta, log_gate, state, chunk_size)
