"""Compile the window hybrid's Triton kernels for a CUDA GPU ahead of time, without one.

Triton's interpreter checks the kernels' arithmetic on the CPU but not that they compile: the
compiled language is stricter (types of loop-carried values, layouts) and a kernel may need more
shared memory than a GPU has. This builds every kernel to a cubin for a target architecture, with the
constants and launch options the launchers use, and reports each one's shared memory:

    python -m zoo.kernels.triton.compile_check [--arch 90] [--head-dim 128] [--features 256] [--sinks 4]
        [--groups 4]

It needs triton (its bundled ptxas), no GPU and no driver. Run it without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from zoo.kernels.triton.chunk_states import chunk_state_constants, chunk_states_kernel, pow2_block
from zoo.kernels.triton.hybrid_kernels import bwd_dkv_kernel, bwd_dq_kernel, fwd_kernel
from zoo.kernels.triton.hybrid_step import step_constants, step_kernel
from zoo.kernels.triton.window_hybrid import STATE_CHUNK, Dims, chosen_tile
from zoo.kernels.triton.window_hybrid import feature_dtype as kernel_feature_dtype

#: the most shared memory one block may use (opt-in), bytes, per compute capability
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_INT_ARGS = {"T", "N", "P", "NC", "NS", "H", "OFF", "HEADS"}


def _signature(fn, const: dict, pointer_types: dict[str, str]) -> dict[str, str]:
    """Triton types of fn's arguments: constexprs by name, pointers as given (default *fp32)."""
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name == "scale":
            sig[name] = "fp32"
        elif name in _INT_ARGS:
            sig[name] = "i32"
        else:
            sig[name] = pointer_types.get(name, "*fp32")
    return sig


def _build(fn, const: dict, pointer_types: dict[str, str], arch: int, options: dict) -> int:
    kernel = triton.compile(
        ASTSource(fn, _signature(fn, const, pointer_types), const),
        target=GPUTarget("cuda", arch, 32),
        options=options,
    )
    return int(kernel.metadata.shared)


def compile_window_hybrid(
    arch: int = 90,
    head_dim: int = 128,
    features: int = 256,
    dtype=torch.bfloat16,
    feature_dtype=None,
    window: int = 64,
    terraced: bool = True,
    has_c: bool = True,
    sinks: int = 0,
    groups: int = 1,
) -> dict[str, int]:
    """Build every kernel of the window hybrid for sm_<arch> with `sinks` attention sinks and `groups`
    query heads per key/value head; returns {kernel: shared memory bytes}. feature_dtype: the dtype the
    kernels read the features in (default: what the launcher chooses for fp32 features and `dtype`)."""
    feature_dtype = feature_dtype or kernel_feature_dtype(dtype, torch.float32, torch.float32)
    meta = lambda *shape, dt=dtype: torch.empty(*shape, device="meta", dtype=dt)  # noqa: E731
    q, v, fq = meta(1, 1, 1, head_dim), meta(1, 1, 1, head_dim), meta(1, 1, 1, features, dt=feature_dtype)
    tile = chosen_tile(head_dim, head_dim, features, dtype, SHARED_LIMIT.get(arch))
    dims = Dims(q, q, v, fq, window, terraced, 1.0, tile, max(STATE_CHUNK, tile), 0)
    const = {k: v for k, v in dims.const.items() if k not in ("num_warps", "num_stages")}
    const["G"] = groups
    sink_const = dict(SINKS=sinks, BS=pow2_block(max(sinks, 1)))
    options = {k: dims.const[k] for k in ("num_warps", "num_stages")}
    bwd_options = {k: dims.bwd_const[k] for k in ("num_warps", "num_stages")}
    t, f = "*" + _TYPES[dtype], "*" + _TYPES[feature_dtype]
    inputs = dict(Q=t, K=t, V=t, FQ=f, FK=f, NSEEN="*i64", SK=t, SV=t)
    built = {
        "fwd": _build(
            fwd_kernel, dict(const, HAS_C=has_c, **sink_const), dict(inputs, Y=t, ARG="*i64"), arch, options
        ),
        "bwd_dq": _build(bwd_dq_kernel, dict(const, HAS_C=has_c, **sink_const), inputs, arch, bwd_options),
        "bwd_dkv": _build(bwd_dkv_kernel, dict(const, HAS_C=has_c, NJ=dims.NJ), inputs, arch, bwd_options),
    }
    for reverse in (False, True):
        cs = chunk_state_constants(
            features,
            head_dim,
            STATE_CHUNK,
            reverse,
            not reverse,
            reverse,
            const["PREC"],
            group=groups if reverse else 1,
            has_scale=reverse,
        )
        built[f"chunk_states{'_reverse' if reverse else ''}"] = _build(
            chunk_states_kernel, cs, dict(X=f, Y="*fp32" if reverse else t), arch, {}
        )
    L = 2 * window if terraced else window
    step = step_constants(L, head_dim, head_dim, features, window, terraced, has_c, sinks, groups)
    built["step"] = _build(
        step_kernel,
        step,
        dict(inputs, KS=t, VS=t, FKS=t, KS_OUT=t, VS_OUT=t, FKS_OUT=t, Y=t, REAL="*i8"),
        arch,
        {},
    )
    return built


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument(
        "--features", type=int, default=256, help="feature-map size F (Hedgehog: 2 * feature_dim)"
    )
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--sinks", type=int, default=4, help="attention sinks (0: the kernels without them)")
    parser.add_argument(
        "--groups", type=int, default=4, help="query heads per key/value head (Llama-3-8B: 32 / 8 = 4)"
    )
    args = parser.parse_args(argv)
    dtype = {v: k for k, v in _TYPES.items()}[args.dtype]
    shared = compile_window_hybrid(
        args.arch, args.head_dim, args.features, dtype, sinks=args.sinks, groups=args.groups
    )
    limit = SHARED_LIMIT.get(args.arch)
    print(json.dumps({"arch": args.arch, "shared_limit": limit, "shared": shared}))
    return 0 if limit is None or max(shared.values()) <= limit else 1


if __name__ == "__main__":
    raise SystemExit(main())
