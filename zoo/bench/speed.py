"""`zoo bench speed`: time every mixer against softmax attention on one attention layer's shapes.

For softmax attention (torch SDPA, and FlashAttention where installed on a GPU) and each mixer (built
with its default options via zoo.get_mixer), at each context length T:

- forward: the prefill forward pass, no gradients;
- forward_backward: forward and backward, gradients to q, k, v, x and the mixer's parameters;
- decode: one new token against the state left by a prefill of T tokens (softmax: a KV cache of T);
- peak memory of each (see zoo.bench.timing.memory_method) and the state / KV-cache bytes after T tokens.

Every measurement has a warm-up run first (which also measures the peak memory), then `--repeats`
timed runs (their median is reported). A measurement whose estimate from the previous context length
exceeds `--max-seconds`, or that runs out of memory, is skipped with a note; a warm-up longer than
`--max-seconds` is the only run. Outputs in --out: results.json (every measurement and the conditions),
results.md (tables: rows mixer, columns T, plus speed-ups against SDPA), PNG plots (time against T,
log-log, one per mode; state bytes).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from zoo.atomic import write_json
from zoo.bench import split_names
from zoo.bench.speed_cases import (
    FlashAttentionCase,
    MixerCase,
    SdpaCase,
    flash_attn_available,
    make_inputs,
    random_tensor,
)
from zoo.bench.timing import measure_peak, memory_method, synchronize, time_runs
from zoo.cpu_memory import ensure_cpu_allocator, release_free_memory
from zoo.kernels import native

__all__ = [
    "MODES",
    "add_arguments",
    "default_mixers",
    "device_name",
    "is_out_of_memory",
    "library_versions",
    "main",
    "measure_case",
    "run_bench",
    "run_order",
    "SlowCaseGuard",
]

#: mode -> what it times, in words
MODES = {
    "forward": "prefill forward",
    "forward_backward": "forward + backward",
    "decode": "decode step (1 token)",
}
REFERENCE = "sdpa"
DEFAULT_SEQ_LENS = {"cpu": [1024, 2048, 4096], "cuda": [1024, 2048, 4096, 8192, 16384, 32768]}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_mixers() -> list[str]:
    """Every registered mixer but the softmax reference (timed as SDPA instead)."""
    from zoo.mixers import get_mixer, list_mixers

    return [name for name in list_mixers() if get_mixer(name).family != "softmax"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mixers",
        nargs="+",
        default=None,
        help="mixer names (space or comma separated; default: every registered mixer but the "
        "softmax reference). SDPA, and FlashAttention where installed, are always timed",
    )
    parser.add_argument(
        "--seq-lens",
        nargs="+",
        type=int,
        default=None,
        help=f"context lengths (default: {DEFAULT_SEQ_LENS['cpu']} on cpu, "
        f"{DEFAULT_SEQ_LENS['cuda']} on cuda)",
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on cpu, bfloat16 on cuda"
    )
    parser.add_argument("--heads", type=int, default=32, help="query heads (default: Llama-3-8B's 32)")
    parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument(
        "--hidden", type=int, default=4096, help="hidden size of the layer input x (default 4096)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed runs first (>= 1; the first measures memory)"
    )
    parser.add_argument("--decode-steps", type=int, default=16, help="decode steps averaged per timed run")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="skip a measurement estimated (from the previous T) to take longer than this per run",
    )
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument(
        "--first-seq-len",
        type=int,
        default=None,
        help="measure this one of --seq-lens before the others (ascending otherwise): the length a short "
        "budget must not miss",
    )
    parser.add_argument(
        "--backends",
        default="auto",
        help="kernel backends per mixer: auto (one row, automatic choice), all (one row per "
        "backend available on the device), or a comma list (torch,triton,fla)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--cpu-allocator",
        choices=("reuse", "system"),
        default="reuse",
        help="CPU: reuse (zoo's default: glibc malloc keeps freed memory for reuse, see zoo.cpu_memory) or "
        "system (as the process starts); recorded in the results",
    )
    parser.add_argument(  # the flag of earlier versions, when reuse was not the default
        "--reuse-freed-memory",
        action="store_const",
        const="reuse",
        dest="cpu_allocator",
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--out", default=None, help="output folder (default: bench-speed-<device>)")


# ---------------------------------------------------------------------------------------------------


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults that depend on the device and check every option; bad input raises ValueError."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    args.device = device
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    args.seq_lens = sorted(set(args.seq_lens or DEFAULT_SEQ_LENS[device]))
    args.mixers = split_names(args.mixers)
    if args.mixers is None:
        args.mixers = default_mixers()
    from zoo.mixers import get_mixer

    for name in args.mixers:
        get_mixer(name)  # an unknown name is a KeyError listing the registered ones
    for option in ("batch", "heads", "kv_heads", "head_dim", "hidden", "repeats", "warmup", "decode_steps"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if min(args.seq_lens) < 1:
        raise ValueError(f"--seq-lens must be >= 1, got {args.seq_lens}")
    first = getattr(args, "first_seq_len", None)
    if first is not None and first not in args.seq_lens:
        raise ValueError(f"--first-seq-len {first} is not one of --seq-lens {args.seq_lens}")
    if args.heads % args.kv_heads:
        raise ValueError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if args.max_seconds <= 0:
        raise ValueError(f"--max-seconds must be > 0, got {args.max_seconds}")
    args.backend_list = _backend_list(args.backends, torch.device(device))
    args.out = args.out or f"bench-speed-{device}"
    return args


def _backend_list(spec: str, device: torch.device) -> list[str | None]:
    """[None] for automatic dispatch, else the backends to force one by one."""
    spec = spec.strip().lower()
    if spec == "auto":
        return [None]
    from zoo.kernels import dispatch

    available = dispatch.available_backends(device)
    if spec == "all":
        return list(available)
    names = [b for b in spec.split(",") if b]
    for name in names:
        if name not in dispatch.BACKENDS:
            raise ValueError(
                f"--backends: unknown backend {name!r}; choose from auto, all, {', '.join(dispatch.BACKENDS)}"
            )
        if name not in available:
            raise ValueError(
                f"--backends: {name!r} is not available on {device}; available: {', '.join(available)}"
            )
    return names


def command_line(args: argparse.Namespace) -> str:
    """The resolved options as one `zoo bench speed` command that repeats this run."""
    parts = [
        "zoo",
        "bench",
        "speed",
        "--mixers",
        *args.mixers,
        "--seq-lens",
        *map(str, args.seq_lens),
        "--batch",
        str(args.batch),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--heads",
        str(args.heads),
        "--kv-heads",
        str(args.kv_heads),
        "--head-dim",
        str(args.head_dim),
        "--hidden",
        str(args.hidden),
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--decode-steps",
        str(args.decode_steps),
        "--max-seconds",
        f"{args.max_seconds:g}",
        "--modes",
        *args.modes,
        "--backends",
        args.backends,
    ]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if getattr(args, "first_seq_len", None) is not None:
        parts += ["--first-seq-len", str(args.first_seq_len)]
    if args.cpu_allocator != "reuse":
        parts += ["--cpu-allocator", args.cpu_allocator]
    parts += ["--out", str(args.out)]
    return shlex.join(parts)


def device_name(device: torch.device) -> str:
    """The device in words for results: the GPU's name, or the CPU model and its logical CPU count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def library_versions() -> dict:
    """Versions of python, torch, zoo and the libraries that change speed (those installed), and CUDA's."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("zoo-linearize", "transformers", "triton", "flash-attn", "flash-linear-attention"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    return versions


# ---------------------------------------------------------------------------------------------------


class SlowCaseGuard:
    """Skips a measurement whose time, extrapolated from the last context length measured for the same
    case and mode (quadratic for softmax attention's forward passes, linear otherwise), would exceed
    --max-seconds, and everything after one that did."""

    def __init__(self, max_seconds: float):
        self.max_seconds = max_seconds
        self.last: dict[tuple[str, str], tuple[int, float]] = {}
        self.over: dict[tuple[str, str], str] = {}

    def reason_to_skip(self, case, mode: str, T: int) -> str | None:
        key = (case.name, mode)
        if key in self.over:
            return self.over[key]
        if key not in self.last:
            return None
        T0, s0 = self.last[key]
        order = 2 if case.kind == "attention" and mode != "decode" else 1
        estimate = s0 * (T / T0) ** order
        if estimate > self.max_seconds:
            return f"skipped: estimated {estimate:.3g} s per run (from {s0:.3g} s at T={T0}) > --max-seconds"
        return None

    def record(self, case, mode: str, T: int, seconds: float) -> None:
        self.last[(case.name, mode)] = (T, seconds)
        if seconds > self.max_seconds:
            self.over[(case.name, mode)] = f"skipped: T={T} already took {seconds:.3g} s > --max-seconds"


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is running out of memory (CUDA or CPU), as torch and the allocators word it."""
    return isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)) or (
        isinstance(err, RuntimeError)
        and any(s in str(err).lower() for s in ("out of memory", "can't allocate", "not enough memory"))
    )


def _record(case, mode: str, T: int, **fields) -> dict:
    row = {
        "name": case.name,
        "kind": case.kind,
        "family": case.family,
        "backend": case.backend,
        "mode": mode,
        "seq_len": T,
        "status": "ok",
        "note": None,
        "times_s": None,
        "median_s": None,
        "min_s": None,
        "tokens_per_s": None,
        "peak_memory_bytes": None,
        "state_bytes": None,
    }
    row.update(fields)
    return row


def measure_case(
    case, mode: str, T: int, fn, args, device, guard: SlowCaseGuard, inner: int = 1, before=None
):
    """Warm up (the first run measures peak memory), then time. Returns (record, output of the first run)."""
    reason = guard.reason_to_skip(case, mode, T)
    if reason is not None:
        return _record(case, mode, T, status="skipped", note=reason), None

    def call():
        if before is not None:
            before()
        return fn()

    if device.type == "cpu":
        release_free_memory()  # the heap the cases before this one left idle: this case grows its own
    try:
        synchronize(device)
        start = time.perf_counter()
        out, peak = measure_peak(call, device)
        synchronize(device)
        first = time.perf_counter() - start
        note = None
        if first > args.max_seconds and device.type == "cuda":
            # a first CUDA call may compile and autotune kernels (Triton: seconds to minutes): one more
            # untimed call says whether the slow part was that or the shape
            start = time.perf_counter()
            call()
            synchronize(device)
            compiled, first = first, time.perf_counter() - start
            note = f"first call {compiled:.3g} s (compilation, not timed)"
        if first > args.max_seconds:
            times = [first]
            note = "; ".join(
                filter(None, [note, f"one run only: the warm-up took {first:.3g} s > --max-seconds"])
            )
        else:
            for _ in range(args.warmup - 1):
                call()
            times = time_runs(call, device, args.repeats, inner=inner)
    except Exception as err:  # noqa: BLE001 - one failing case must not end the bench; the record says why
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if is_out_of_memory(err):
            guard.over[(case.name, mode)] = f"skipped: out of memory at T={T}"
            return _record(
                case, mode, T, status="skipped", note=f"out of memory: {str(err).splitlines()[0][:200]}"
            ), None
        return _record(
            case, mode, T, status="error", note=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        ), None
    median = statistics.median(times)
    guard.record(case, mode, T, median)
    tokens = 1 if mode == "decode" else T
    return _record(
        case,
        mode,
        T,
        note=note,
        times_s=times,
        median_s=median,
        min_s=min(times),
        tokens_per_s=args.batch * tokens / median,
        peak_memory_bytes=peak,
    ), out


def _bench_case(case, T: int, inputs, train_inputs, step, dy, args, device, guard) -> list[dict]:
    """The three modes of one case at one context length."""
    records = []
    state = None
    if "forward" in args.modes:
        rec, out = measure_case(case, "forward", T, lambda: case.prefill(inputs), args, device, guard)
        if out is not None:
            state = case.decode_state(inputs, out)
            rec["state_bytes"] = case.state_bytes(state) // args.batch
        records.append(rec)
    elif "decode" in args.modes:  # the state only: one untimed prefill (none for softmax's KV cache)
        try:
            state = case.decode_state(inputs, case.prefill(inputs) if case.kind == "mixer" else None)
        except Exception as err:  # noqa: BLE001 - recorded as the decode measurement's note below
            records.append(
                _record(
                    case,
                    "decode",
                    T,
                    status="error",
                    note=f"prefill for the state failed: {type(err).__name__}: {err}"[:300],
                )
            )
            return records
    if "decode" in args.modes:
        if state is None:
            records.append(
                _record(
                    case,
                    "decode",
                    T,
                    status="skipped",
                    note="skipped: no state (the prefill of T tokens was skipped or failed)",
                )
            )
        else:
            rec, _ = measure_case(
                case,
                "decode",
                T,
                lambda: case.decode(state, step),
                args,
                device,
                guard,
                inner=args.decode_steps,
            )
            rec["state_bytes"] = case.state_bytes(state) // args.batch
            records.append(rec)
        del state
    if "forward_backward" in args.modes:
        rec, _ = measure_case(
            case,
            "forward_backward",
            T,
            lambda: case.train(train_inputs, dy),
            args,
            device,
            guard,
            before=train_inputs.clear_grads,
        )
        records.append(rec)
    return records


def build_cases(args, device: torch.device, dtype: torch.dtype) -> list:
    """SDPA, FlashAttention where installed (CUDA), then each mixer once per backend."""
    cases: list = [SdpaCase(REFERENCE)]
    if flash_attn_available(device) and dtype in (torch.bfloat16, torch.float16):
        cases.append(FlashAttentionCase())
    for name in args.mixers:
        for backend in args.backend_list:
            cases.append(
                MixerCase(name, args.heads, args.kv_heads, args.head_dim, args.hidden, dtype, device, backend)
            )
    return cases


def run_bench(args: argparse.Namespace, log=print) -> dict:
    """Run every case at every context length; return the results (also written to --out/results.json
    after each context length, so a long run killed midway keeps what it measured)."""
    args = _resolve(args)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    allocator = None
    if device.type == "cpu":  # before anything is timed, so SDPA and the mixers run under one allocator
        allocator = ensure_cpu_allocator(args.cpu_allocator)
        if args.cpu_allocator == "system" and "unchanged" not in allocator:
            allocator += " (--cpu-allocator system came after this process had set it)"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = build_cases(args, device, dtype)
    results = {
        "bench": "speed",
        "command": command_line(args),
        "argv": sys.argv,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": device.type, "name": device_name(device)},
        "threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "ZOO_KERNEL_BACKEND")},
        "dtype": args.dtype,
        "shape": {
            "batch": args.batch,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "hidden": args.hidden,
        },
        "seq_lens": args.seq_lens,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "decode_steps": args.decode_steps,
        "max_seconds": args.max_seconds,
        "modes": {m: MODES[m] for m in args.modes},
        "reference": REFERENCE,
        "cases": [{"name": c.name, "kind": c.kind, "family": c.family, "backend": c.backend} for c in cases],
        "memory_method": memory_method(device),
        "cpu_allocator": allocator or "not applicable (not the CPU)",
        "cpu_c_kernels": native.status() if device.type == "cpu" else None,
        "versions": library_versions(),
        "results": [],
    }
    guard = SlowCaseGuard(args.max_seconds)
    for T in run_order(args.seq_lens, getattr(args, "first_seq_len", None)):
        inputs = make_inputs(
            args.batch, args.heads, args.kv_heads, args.head_dim, args.hidden, T, dtype, device
        )
        step = make_inputs(
            args.batch, args.heads, args.kv_heads, args.head_dim, args.hidden, 1, dtype, device, seed=1
        )
        train_inputs = inputs.requiring_grad()
        dy = random_tensor(inputs.q.shape, dtype, device, seed=2)  # the gradient reaching the output
        for case in cases:
            for rec in _bench_case(case, T, inputs, train_inputs, step, dy, args, device, guard):
                results["results"].append(rec)
                log(_progress_line(rec))
        write_json(out_dir / "results.json", results)
        del inputs, train_inputs, dy
    return results


def run_order(seq_lens: list[int], first: int | None) -> list[int]:
    """The context lengths in the order they are measured: `first` (if given), then the rest ascending."""
    return ([first] if first is not None else []) + [T for T in sorted(seq_lens) if T != first]


def _progress_line(rec: dict) -> str:
    from zoo.bench.report import format_bytes, format_seconds

    what = (
        f"{format_seconds(rec['median_s'])}  peak {format_bytes(rec['peak_memory_bytes'])}"
        if rec["status"] == "ok"
        else rec["note"]
    )
    return f"  {rec['name']:<22} {rec['mode']:<17} T={rec['seq_len']:<6} {what}"


def main(args: argparse.Namespace) -> int:
    from zoo.bench.speed_report import write_report

    print(f"zoo bench speed: writing to {args.out or 'bench-speed-<device>'}", flush=True)
    results = run_bench(args, log=lambda line: print(line, flush=True))
    paths = write_report(results, Path(args.out))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
