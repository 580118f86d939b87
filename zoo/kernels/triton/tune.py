"""Tune the window hybrid's Triton launch settings on a GPU, and find where its time goes.

    python -m zoo.kernels.triton.tune --out DIR [--seq-lens 4096 16384]
        [--configs TILE:WARPS:STAGES:FEATURES ...] [--budget-seconds 300]

At one attention layer of Llama-3-8B's shape (32 query heads, 8 key/value heads, head dim 128, 256
Hedgehog features, a terraced 64-token window and 4 sinks, bf16), for the shipped defaults and each
config of tile, num_warps, num_stages and feature dtype (`launch_config`):

- `sweep`: the kernel's forward and forward + backward time (median of 5 after a warm-up, which
  compiles), and its error against the PyTorch chunked form (zoo.kernels.window_hybrid) in fp32 at the
  first length: output and the gradients of q, k, v, phi(q), phi(k), each as max |difference| / max |ref|;
- `profile`: CUDA time per kernel (torch.profiler) of one forward + backward, default and best settings;
- `mixer`: the whole `lolcats-terraced-sink` layer (feature maps included) against SDPA, prefill and
  forward + backward, default and best settings;
- `decode`: the kernels one decoding step of that layer launches, and its time.

DIR/tune.json is rewritten after every measurement (a run stopped at its limit keeps what it had), and
DIR/tune.md says it in tables. `--dry-run` rehearses everything at tiny shapes on the CPU (through
Triton's interpreter, TRITON_INTERPRET=1) for tests.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from zoo.kernels.triton.window_hybrid import SINK_BACKWARDS, launch_config, window_hybrid_triton
from zoo.kernels.window_hybrid import window_hybrid_chunked

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: the layer shape: (query heads, key/value heads, head dim, features, hidden size)
LLAMA3_8B = (32, 8, 128, 256, 4096)
TINY = (4, 2, 16, 32, 64)
WINDOW, SINKS = 64, 4


class Budget:
    """Seconds left of --budget-seconds; steps skip what would start after it is spent."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device, repeats: int) -> tuple[float, float]:
    """(first call's seconds, median of `repeats` further calls)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def layer_inputs(T: int, shape, device, seed: int = 0) -> dict:
    """q [1, H, T, D], k, v [1, HKV, T, D] (bf16 on a GPU, fp32 on the CPU), phi(q) [1, H, T, F],
    phi(k) [1, HKV, T, F] (fp32: as the Hedgehog feature map gives them, softmax rows), a, b [H]."""
    H, HKV, D, F, _ = shape
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    feats = lambda h: torch.softmax(rand(1, h, T, F), -1)  # noqa: E731
    x = dict(q=rand(1, H, T, D), k=rand(1, HKV, T, D), v=rand(1, HKV, T, D))
    x = {k: t.to(device=device, dtype=dtype) for k, t in x.items()}
    x["fq"], x["fk"] = feats(H).to(device), feats(HKV).to(device)
    a = torch.sigmoid(rand(H)).to(device)
    x["a"], x["b"] = a, 1 - a
    return x


GRAD_NAMES = ("q", "k", "v", "fq", "fk")


def _run_kernel(x: dict, grad: bool, dy: torch.Tensor | None = None):
    """The Triton window hybrid on x; with grad: forward + backward, returns (y, grads)."""
    if not grad:
        with torch.no_grad():
            return window_hybrid_triton(**_call_args(x), window=WINDOW, terraced=True, sinks=SINKS)[0], None
    leaves = {n: x[n].detach().requires_grad_(True) for n in GRAD_NAMES}
    y, _ = window_hybrid_triton(**_call_args({**x, **leaves}), window=WINDOW, terraced=True, sinks=SINKS)
    y.backward(dy if dy is not None else torch.ones_like(y))
    return y, [leaves[n].grad for n in GRAD_NAMES]


def _call_args(x: dict) -> dict:
    return {n: x[n] for n in (*GRAD_NAMES, "a", "b")}


def reference(x: dict, dy: torch.Tensor):
    """The PyTorch chunked form in fp32 (key/value heads repeated for it): y and the gradients."""
    G = x["q"].shape[1] // x["k"].shape[1]
    leaves = {n: x[n].detach().float().requires_grad_(True) for n in GRAD_NAMES}
    rep = {n: leaves[n].repeat_interleave(G, 1) if n in ("k", "v", "fk") else leaves[n] for n in GRAD_NAMES}
    y, _ = window_hybrid_chunked(**rep, a=x["a"], b=x["b"], window=WINDOW, terraced=True, sinks=SINKS)
    y.backward(dy.float())
    # a leaf the output does not reach (phi(k) when no key is linear yet) has no gradient: zero
    return y.detach(), [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves.values()]


def relative_errors(got_y, got_grads, ref_y, ref_grads) -> dict:
    """max |got - ref| / max |ref| for y and each gradient."""
    err = lambda a, b: float((a.detach().float() - b).abs().max() / b.abs().max().clamp(min=1e-30))  # noqa: E731
    out = {"y": err(got_y, ref_y)}
    out.update({f"d{n}": err(g, r) for n, g, r in zip(GRAD_NAMES, got_grads, ref_grads)})
    return out


#: the configs timed by default beside the defaults, TILE:WARPS:STAGES:FEATURES[:STATE_CHUNK[:STATE_TILE
#: [:STATE_STAGES]]]: ones that compile for sm_90 within its shared memory with few register spills
#: (ptxas, checked on the CPU with compile_check's builds), around the defaults the H200 runs chose
DEFAULT_CONFIGS = (
    "16:8:1:float32",  # the defaults before the first tuning run
    "32:8:2:bfloat16:-:-:-:torch",  # the defaults of run 3
    "32:8:2:bfloat16:-:-:-:kernel:1",
    "64:8:1:bfloat16:-:-:-:torch",
)


#: a config's fields, in the order of its text form; the first four are required
CONFIG_FIELDS = (
    "tile",
    "num_warps",
    "num_stages",
    "feature_dtype",
    "state_chunk",
    "state_tile",
    "state_stages",
    "sink_backward",
    "bwd_num_stages",
)


def parse_config(text: str) -> dict:
    """'TILE:WARPS:STAGES:FEATURES[:STATE_CHUNK[:STATE_TILE[:STATE_STAGES[:SINK_BACKWARD[:BWD_STAGES]]]]]'
    -> a config
    (FEATURES a dtype name, SINK_BACKWARD one of SINK_BACKWARDS, the others integers; '-' leaves one of
    the optional fields at its default)."""
    parts = text.split(":")
    ok, config = 4 <= len(parts) <= len(CONFIG_FIELDS), {}
    for i, (key, value) in enumerate(zip(CONFIG_FIELDS, parts)):
        if value == "-" and i >= 4:
            continue
        if key == "feature_dtype":
            ok = ok and value in DTYPES
        elif key == "sink_backward":
            ok = ok and value in SINK_BACKWARDS
        else:
            ok = ok and value.isdigit()
            value = int(value) if value.isdigit() else value
        config[key] = value
    if not ok:
        raise argparse.ArgumentTypeError(
            "a config is TILE:WARPS:STAGES:FEATURES"
            "[:STATE_CHUNK[:STATE_TILE[:STATE_STAGES[:SINK_BACKWARD[:BWD_STAGES]]]]] "
            f"(e.g. 32:8:2:bfloat16 or 32:8:2:bfloat16:-:-:-:torch; features one of {', '.join(DTYPES)}, "
            f"sink backward one of {', '.join(SINK_BACKWARDS)}, '-' a default); got {text!r}"
        )
    return config


def _launch(config: dict):
    """launch_config for a config of this module (feature dtype by name; None: the defaults)."""
    if not config:
        return launch_config()
    settings = dict(config)
    settings["feature_dtype"] = DTYPES[settings["feature_dtype"]] if settings.get("feature_dtype") else None
    return launch_config(**settings)


def sweep(args, device, shape, budget: Budget, results: dict, save) -> None:
    """Time the default settings, then every config of the grid, at each length; errors at the first."""
    configs = [{}] + args.configs  # {}: the shipped defaults
    for i, T in enumerate(args.seq_lens):
        x = layer_inputs(T, shape, device)
        dy = torch.randn_like(x["q"][..., :1].expand(*x["q"].shape[:3], x["v"].shape[-1]).float())
        dy = dy.to(x["q"].dtype)
        ref = reference(x, dy) if i == 0 else None
        for config in configs:
            if budget.left() < 0:
                results["notes"].append(f"sweep stopped at T={T} by --budget-seconds")
                return
            row = dict(config=config or "default", T=T)
            try:
                with _launch(config):
                    row["first_fwd_s"], row["fwd_s"] = _median_seconds(
                        functools.partial(_run_kernel, x, False), device, args.repeats
                    )
                    row["first_train_s"], row["train_s"] = _median_seconds(
                        functools.partial(_run_kernel, x, True, dy), device, args.repeats
                    )
                    if ref is not None:
                        y, grads = _run_kernel(x, True, dy)
                        row["errors"] = relative_errors(y, grads, *ref)
            except Exception as exc:  # a config that does not compile or fit: recorded, the sweep goes on
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            results["sweep"].append(row)
            save()
            print(json.dumps(row), flush=True)


def best_config(results: dict, T: int, key: str, max_error: float) -> dict | None:
    """The fastest config at length T by `key` whose errors (where measured) stay under max_error."""
    bad = {
        json.dumps(r["config"], sort_keys=True)
        for r in results["sweep"]
        if "errors" in r and max(r["errors"].values()) > max_error
    }
    rows = [
        r
        for r in results["sweep"]
        if r["T"] == T
        and key in r
        and r["config"] != "default"
        and json.dumps(r["config"], sort_keys=True) not in bad
    ]
    return min(rows, key=lambda r: r[key])["config"] if rows else None


def profile_kernels(x: dict, dy, device, config: dict, top: int = 15) -> list[dict]:
    """CUDA (or CPU) time per kernel name of one forward + backward, largest first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with _launch(config):
        _run_kernel(x, True, dy)  # compiled and warm
        _sync(device)
        with profile(activities=activities) as prof:
            _run_kernel(x, True, dy)
            _sync(device)
    rows = []
    for e in prof.key_averages():
        us = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if us > 0:
            rows.append(dict(name=e.key[:90], calls=e.count, us=round(float(us), 1)))
    rows.sort(key=lambda r: -r["us"])
    return rows[:top]


def mixer_times(args, device, shape, config: dict, T: int) -> dict:
    """The whole lolcats-terraced-sink layer and SDPA: prefill and forward + backward seconds."""
    from zoo.bench.speed_cases import MixerCase, SdpaCase, make_inputs

    H, HKV, D, _, hidden = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inp = make_inputs(1, H, HKV, D, hidden, T, dtype, device)
    out = {}
    with _launch(config):
        for case in (SdpaCase(), MixerCase("lolcats-terraced-sink", H, HKV, D, hidden, dtype, device)):
            dy = torch.randn(1, H, T, D, device=device, dtype=dtype)
            train_inp = inp.requiring_grad()
            _, out[f"{case.name}_prefill_s"] = _median_seconds(
                functools.partial(case.prefill, inp), device, args.repeats
            )
            _, out[f"{case.name}_train_s"] = _median_seconds(
                functools.partial(case.train, train_inp, dy), device, args.repeats
            )
    return out


def decode_profile(args, device, shape, T: int) -> dict:
    """One decoding step of the lolcats-terraced-sink layer after T tokens: its kernels and time."""
    from torch.profiler import ProfilerActivity, profile

    from zoo.bench.speed_cases import MixerCase, make_inputs

    H, HKV, D, _, hidden = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    case = MixerCase("lolcats-terraced-sink", H, HKV, D, hidden, dtype, device)
    context = make_inputs(1, H, HKV, D, hidden, T, dtype, device)
    state = case.decode_state(context, case.prefill(context))
    step = make_inputs(1, H, HKV, D, hidden, 1, dtype, device, seed=1)
    _, seconds = _median_seconds(lambda: case.decode(state, step), device, 20)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        case.decode(state, step)
        _sync(device)
    kernels = [e for e in prof.events() if device.type == "cuda" and e.device_type.name == "CUDA"]
    names: dict[str, int] = {}
    for e in kernels:
        names[e.name[:70]] = names.get(e.name[:70], 0) + 1
    ops = sorted(
        ((e.key, e.count) for e in prof.key_averages() if e.key.startswith("aten::")), key=lambda r: -r[1]
    )
    return dict(
        T=T,
        step_s=seconds,
        kernel_launches=len(kernels),
        kernels=sorted(names.items(), key=lambda r: -r[1])[:25],
        aten_ops=ops[:25],
    )


def _versions(device) -> dict:
    import triton

    v = dict(python=sys.version.split()[0], torch=torch.__version__, triton=triton.__version__)
    if device.type == "cuda":
        v["gpu"] = torch.cuda.get_device_name(device)
    return v


def _ms(row: dict, key: str) -> str:
    return f"{row[key] * 1e3:.3f}" if key in row else "-"


def markdown(results: dict) -> str:
    """The sweep, profiles, mixer and decode results as Markdown tables."""
    lines = [
        "# Window hybrid Triton tuning",
        "",
        f"`{results['command']}`",
        "",
        f"- {results['versions']}",
        "",
    ]
    lines += ["## Sweep (kernel alone; ms, median)", ""]
    lines += [
        "| T | tile | warps | stages | features | state chunk | state tile | state stages | sink bwd "
        "| bwd stages | fwd | fwd+bwd | max rel. error | note |",
        "|" + "---|" * 14,
    ]
    for r in results["sweep"]:
        c = r["config"] if isinstance(r["config"], dict) else {}
        name = [str(c.get(k, "default")) for k in CONFIG_FIELDS]
        ms = functools.partial(_ms, r)
        err = f"{max(r['errors'].values()):.2e}" if "errors" in r else "-"
        cells = [str(r["T"]), *name, ms("fwd_s"), ms("train_s"), err, r.get("error", "")]
        lines.append("| " + " | ".join(cells) + " |")
    for title, key in (("Profile", "profile"), ("Whole layer", "mixer")):
        if results.get(key):
            lines += ["", f"## {title}", "", "```", json.dumps(results[key], indent=1), "```"]
    if results.get("decode"):
        lines += ["", "## Decode step", "", "```", json.dumps(results["decode"], indent=1), "```"]
    if results["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument(
        "--configs",
        type=parse_config,
        nargs="+",
        default=[parse_config(c) for c in DEFAULT_CONFIGS],
        help="TILE:WARPS:STAGES:FEATURES launch settings to time beside the defaults",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--max-error", type=float, default=0.05, help="configs above this error are not picked"
    )
    parser.add_argument("--budget-seconds", type=float, default=300.0)
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on the CPU (Triton's interpreter)"
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--dry-run runs Triton's interpreter: set TRITON_INTERPRET=1 before starting")
        device, shape = torch.device("cpu"), TINY
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; --dry-run rehearses on the CPU")
        device, shape = torch.device("cuda"), LLAMA3_8B
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_seconds)
    results = dict(
        command="python -m zoo.kernels.triton.tune " + " ".join(argv if argv is not None else sys.argv[1:]),
        versions=_versions(device),
        shape=dict(
            zip(("heads", "kv_heads", "head_dim", "features", "hidden"), shape), window=WINDOW, sinks=SINKS
        ),
        sweep=[],
        notes=[],
    )

    def save():
        (args.out / "tune.json").write_text(json.dumps(results, indent=1))
        (args.out / "tune.md").write_text(markdown(results))

    sweep(args, device, shape, budget, results, save)
    T = args.seq_lens[-1]
    best = best_config(results, T, "train_s", args.max_error)
    results["best"] = dict(T=T, by="train_s", config=best)
    save()
    x = layer_inputs(T, shape, device)
    dy = torch.randn(*x["q"].shape[:3], x["v"].shape[-1], device=device).to(x["q"].dtype)
    steps = [
        (
            "profile",
            lambda: {
                name: profile_kernels(x, dy, device, c) for name, c in (("default", {}), ("best", best or {}))
            },
        ),
        (
            "mixer",
            lambda: {
                f"{name}@T={t}": mixer_times(args, device, shape, c, t)
                for t in args.seq_lens
                for name, c in (("default", {}), ("best", best or {}))
            },
        ),
        ("decode", lambda: decode_profile(args, device, shape, args.seq_lens[0])),
    ]
    for key, step in steps:
        if budget.left() < 0:
            results["notes"].append(f"{key} skipped: --budget-seconds spent")
            continue
        try:
            results[key] = step()
        except Exception as exc:
            results["notes"].append(f"{key} failed: {type(exc).__name__}: {str(exc)[:300]}")
        save()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
