"""`zoo bench generate`: greedy generation throughput of a whole model, the teacher against its linearized
forms, by batch size B and context length C.

Each model (the teacher, then the teacher linearized with each of `--mixers`, untrained: speed does not
depend on the weights) runs one cell per (C, B), gpt-fast style, the prefill timed apart from decoding:

- the context. `--context-fill prefill`: a forward of B sequences of C random token ids (timed: the
  prefill seconds). `synthetic`: no C-token prefill, so long sweeps stay tractable. The teacher gets a KV
  cache of C random keys and values per layer (nothing timed before decoding). A linearized model gets a
  real prefill of min(C, `--synthetic-prefill`) tokens (timed), enough to fill its mixers' windows: from
  there its state is constant in size, so decoding costs the same at any longer context. That is
  checked, not assumed: the mixer state's bytes after the prefill and after decoding are compared, and
  a cell whose state changed says it measured context N, not C. A linearized model that keeps softmax
  layers (a growing KV cache) prefills C real tokens instead. Every cell says how its context was made.
- decoding: one untimed warm-up step (first-call costs: lazy set-up, kernel compilation), then
  `--new-tokens` greedy steps of one token per sequence through the model's forward with its
  cache (the teacher: transformers' StaticCache, preallocated for C + 1 + new tokens, or `--teacher-cache
  dynamic`, model.generate's default, which grows by concatenation; a linearized model: zoo's ZooCache),
  timed as a whole, CUDA synchronized before each clock read: tokens/s = B * new tokens / seconds.
- memory: CUDA, torch.cuda.max_memory_allocated over the cell, weights included; CPU, not measured: the
  cache/state bytes plus the weights' bytes (a floor: activations are not counted).

A teacher cell whose KV cache (2 * layers * kv heads * head dim * C * B * dtype bytes) exceeds
`--memory-limit-gb` (default 80% of the device's memory) is recorded as not fitting without running; a
cell estimated from a smaller cell of the same model (linearly in B and context) to take longer than
`--max-seconds`, or larger than one that ran out of memory or took longer, is skipped; a cell that runs
out of memory is recorded "oom" and the sweep goes on. Outputs in --out: results.json (every cell and
the conditions, written after each cell), results.md (decode tokens/s, rows model x context, columns
batch; per context, the best linearized tokens/s over the teacher's best) and one plot of tokens/s
against batch per context.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zoo.atomic import write_json
from zoo.bench import split_names
from zoo.bench.speed import DTYPES, device_name, is_out_of_memory, library_versions
from zoo.bench.timing import synchronize
from zoo.devices import keep_device_blocks_whole
from zoo.kernels import native

__all__ = [
    "CONTEXT_FILLS",
    "ModelForm",
    "add_arguments",
    "default_mixers",
    "kv_bytes_per_token",
    "linearized_folder",
    "main",
    "new_kv_cache",
    "plan_cells",
    "random_kv_cache",
    "run_cell",
    "run_generate_bench",
    "teacher_forms",
]

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MIXER = "lolcats-terraced-sink"
DEFAULT_CONTEXTS = [1024, 2048, 4096, 8192]
DEFAULT_BATCHES = [1, 4, 16, 64]
#: --context-fill -> how a cell's context is made, in words
CONTEXT_FILLS = {
    "prefill": "a prefill of C random tokens (timed)",
    "synthetic": "teacher: a KV cache of C random keys/values; linearized: a prefill of min(C, N) tokens",
}
TEACHER_CACHES = ("static", "dynamic")
MEMORY_SHARE = 0.8  # of the device's memory: the default --memory-limit-gb


def default_mixers() -> list[str]:
    """lolcats-terraced-sink where it is registered (the recipe `zoo demo` trains), else none."""
    from zoo.mixers import list_mixers

    return [DEFAULT_MIXER] if DEFAULT_MIXER in list_mixers() else []


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="the teacher: an embedded name, a hub id or a model folder (as zoo.load_teacher); or a "
        "saved linearized model or run folder (then it is timed beside its teacher's shape with "
        f"softmax attention). Default {DEFAULT_MODEL}",
    )
    parser.add_argument(
        "--mixers",
        nargs="*",
        default=None,
        help="mixers to linearize the teacher with, untrained (space or comma separated; default: "
        f"{DEFAULT_MIXER}; none for a saved linearized model)",
    )
    parser.add_argument("--contexts", nargs="+", type=int, default=None, help=f"default {DEFAULT_CONTEXTS}")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help=f"default {DEFAULT_BATCHES}")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens decoded per sequence")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on cpu, bfloat16 on cuda"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        help="skip a cell estimated from a smaller one of the same model to take longer than this",
    )
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        default=None,
        help="a teacher cell whose KV cache would exceed this is recorded as not fitting (default: "
        f"{MEMORY_SHARE * 100:.0f}%% of the GPU's memory, or of the machine's RAM on cpu)",
    )
    parser.add_argument(
        "--context-fill",
        choices=list(CONTEXT_FILLS),
        default="prefill",
        help="prefill: a timed prefill of C random tokens; synthetic: the teacher gets a KV cache of C "
        "random keys/values, a linearized model a prefill of min(C, --synthetic-prefill) tokens (its "
        "state is constant from there; checked). Default prefill",
    )
    parser.add_argument(
        "--synthetic-prefill",
        type=int,
        default=512,
        help="--context-fill synthetic: tokens a linearized model prefills (at most C; enough to fill "
        "its mixers' windows)",
    )
    parser.add_argument(
        "--teacher-cache",
        choices=TEACHER_CACHES,
        default="static",
        help="the teacher's KV cache: static (preallocated, written in place, as gpt-fast) or dynamic "
        "(grown by concatenation each step, model.generate's default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids and keys/values")
    parser.add_argument("--out", default=None, help="output folder (default: bench-generate-<device>)")


# ---------------------------------------------------------------------------------------------------


def linearized_folder(model: str) -> Path | None:
    """The folder of a saved linearized model that `model` names (the folder, or a run folder holding
    it in model/), or None when `model` is anything else."""
    path = Path(model)
    for folder in (path / "model", path):
        config = folder / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("zoo_mixers"):
            return folder
    return None


def _device_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_positive(name: str, values: Sequence[float]) -> None:
    bad = [v for v in values if v < 1]
    if bad:
        raise ValueError(f"--{name} must be >= 1, got {', '.join(map(str, bad))}")


def _resolve(args: argparse.Namespace, check_model: bool = True) -> argparse.Namespace:
    """Fill defaults that depend on the device and check every option before any model loads; bad input
    raises a one-line ValueError. `check_model` False: --model only names models built by the caller."""
    from zoo.mixers import list_mixers
    from zoo.teacher import EMBEDDED_TEACHERS

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    args.device = device
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    args.contexts = list(args.contexts or DEFAULT_CONTEXTS)
    args.batches = list(args.batches or DEFAULT_BATCHES)
    _check_positive("contexts", args.contexts)
    _check_positive("batches", args.batches)
    args.contexts, args.batches = sorted(set(args.contexts)), sorted(set(args.batches))
    for option in ("new_tokens", "synthetic_prefill") + (("threads",) if args.threads is not None else ()):
        _check_positive(option.replace("_", "-"), [getattr(args, option)])
    if args.max_seconds <= 0:
        raise ValueError(f"--max-seconds must be > 0, got {args.max_seconds}")
    saved = linearized_folder(args.model)
    if args.mixers is None:
        args.mixers = [] if saved is not None else default_mixers()
    args.mixers = split_names(args.mixers)
    unknown = [name for name in args.mixers if name not in list_mixers()]
    if unknown:
        raise ValueError(
            f"--mixers: unknown mixer {', '.join(map(repr, unknown))}; registered: {', '.join(list_mixers())}"
        )
    is_name = args.model in EMBEDDED_TEACHERS or "/" in args.model
    if check_model and saved is None and not Path(args.model).exists() and not is_name:
        raise ValueError(
            f"--model {args.model!r}: not an embedded teacher ({', '.join(EMBEDDED_TEACHERS)}), not a "
            "folder and not a hub id (owner/name)"
        )
    if args.memory_limit_gb is not None and args.memory_limit_gb <= 0:
        raise ValueError(f"--memory-limit-gb must be > 0, got {args.memory_limit_gb}")
    if args.memory_limit_gb is None:
        total = _device_memory_bytes(torch.device(device))
        args.memory_limit_bytes = None if total is None else int(MEMORY_SHARE * total)
        args.memory_limit_source = f"{MEMORY_SHARE:.0%} of the {device}'s memory"
    else:
        args.memory_limit_bytes = int(args.memory_limit_gb * 1e9)
        args.memory_limit_source = "--memory-limit-gb"
    args.out = args.out or f"bench-generate-{device}"
    return args


def command_line(args: argparse.Namespace) -> str:
    """The resolved options as one `zoo bench generate` command that repeats this run."""
    parts = ["zoo", "bench", "generate", "--model", str(args.model), "--mixers", *args.mixers]
    parts += ["--contexts", *map(str, args.contexts), "--batches", *map(str, args.batches)]
    parts += ["--new-tokens", str(args.new_tokens), "--device", args.device, "--dtype", args.dtype]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    parts += ["--max-seconds", f"{args.max_seconds:g}"]
    if args.memory_limit_gb is not None:
        parts += ["--memory-limit-gb", f"{args.memory_limit_gb:g}"]
    parts += ["--context-fill", args.context_fill, "--synthetic-prefill", str(args.synthetic_prefill)]
    parts += ["--teacher-cache", args.teacher_cache, "--seed", str(args.seed), "--out", str(args.out)]
    return shlex.join(parts)


# ---------------------------------------------------------------------------------------------------
# the models and the cells


@dataclass
class ModelForm:
    """One model the bench times: its name in the tables, its kind ("teacher" or "linearized"), its
    config, how many of its layers keep softmax attention (a KV cache growing with the context), and
    `build()`, which returns it on the device, in eval mode (called once, when its cells run)."""

    name: str
    kind: str
    config: Any
    softmax_layers: int
    build: Callable[[], Any] = field(repr=False)


def kv_bytes_per_token(config: Any, softmax_layers: int, dtype: torch.dtype) -> int:
    """Bytes of KV cache per token of one sequence: 2 (keys, values) * layers * kv heads * head dim *
    dtype bytes, over the layers that keep softmax attention."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * softmax_layers * config.num_key_value_heads * head_dim * element


def teacher_forms(
    config: Any, build_teacher: Callable[[], Any], mixers: Sequence[str], name: str = "teacher"
) -> list[ModelForm]:
    """The teacher and one linearized form per mixer (a fresh teacher, linearized untrained)."""
    import zoo

    def linearized(mixer: str) -> Callable[[], Any]:
        return lambda: zoo.linearize(build_teacher(), mixer).eval()

    forms = [ModelForm(name, "teacher", config, config.num_hidden_layers, build_teacher)]
    forms += [ModelForm(mixer, "linearized", config, 0, linearized(mixer)) for mixer in mixers]
    return forms


def _model_forms(args: argparse.Namespace) -> list[ModelForm]:
    """The forms of --model: a teacher (and --mixers), or a saved linearized model beside its teacher's
    shape with softmax attention (the same weights, the mixers' own left out)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import zoo
    from zoo.teacher import resolve_teacher_path

    dtype, device = DTYPES[args.dtype], args.device
    saved = linearized_folder(args.model)
    if saved is None:
        path = resolve_teacher_path(args.model)
        config = AutoConfig.from_pretrained(path)
        return teacher_forms(config, lambda: zoo.load_teacher(path, dtype, device)[0], args.mixers)
    raw = json.loads((saved / "config.json").read_text())
    family = raw["model_type"].removeprefix("zoo_")
    dropped = ("model_type", "zoo_mixers", "architectures", "transformers_version")
    config = AutoConfig.for_model(family, **{k: v for k, v in raw.items() if k not in dropped})

    def build_teacher():
        keep_device_blocks_whole()  # before transformers' initialization
        model = AutoModelForCausalLM.from_pretrained(saved, config=config, dtype=dtype, use_safetensors=True)
        return model.to(device).eval()

    forms = teacher_forms(config, build_teacher, args.mixers)
    specs = raw["zoo_mixers"]
    mixers = sorted({spec["mixer"] for spec in specs if spec is not None})
    forms.insert(
        1,
        ModelForm(
            f"{'+'.join(mixers)} (saved)",
            "linearized",
            config,
            sum(spec is None for spec in specs),
            lambda: zoo.load_linearized(saved, dtype, device)[0],
        ),
    )
    return forms


def plan_cells(
    forms: Sequence[ModelForm],
    contexts: Sequence[int],
    batches: Sequence[int],
    new_tokens: int,
    context_fill: str,
    dtype: torch.dtype,
    memory_limit_bytes: int | None,
) -> list[dict]:
    """Every (model, context, batch) cell in run order, each "planned", or "skipped" when its KV cache
    alone would exceed `memory_limit_bytes`. Loads nothing, runs nothing."""
    cells = []
    for form in forms:
        per_token = kv_bytes_per_token(form.config, form.softmax_layers, dtype)
        for context in contexts:
            for batch in batches:
                kv_bytes = per_token * context * batch
                cell = {
                    "model": form.name,
                    "kind": form.kind,
                    "context": context,
                    "batch": batch,
                    "new_tokens": new_tokens,
                    "context_fill": context_fill,
                    "status": "planned",
                    "reason": None,
                    "softmax_layers": form.softmax_layers,
                    "kv_cache_bytes": kv_bytes,
                    "context_made_by": None,
                    "prefill_tokens": None,
                    "prefill_seconds": None,
                    "decode_seconds": None,
                    "decode_tokens_per_s": None,
                    "cache_tokens_after_decode": None,
                    "state_bytes": None,
                    "peak_memory_bytes": None,
                }
                if memory_limit_bytes is not None and kv_bytes > memory_limit_bytes:
                    cell["status"] = "skipped"
                    cell["reason"] = (
                        f"would not fit: a KV cache of {kv_bytes / 1e9:.3g} GB > the limit of "
                        f"{memory_limit_bytes / 1e9:.3g} GB"
                    )
                cells.append(cell)
    return cells


# ---------------------------------------------------------------------------------------------------
# one cell


def new_kv_cache(config: Any, kind: str, max_len: int):
    """An empty transformers KV cache for a softmax model: "static" (preallocated for `max_len` tokens,
    written in place) or "dynamic" (grown by concatenation)."""
    from transformers.cache_utils import DynamicCache, StaticCache

    if kind == "static":
        return StaticCache(config=config, max_cache_len=max_len)
    return DynamicCache(config=config)


def random_kv_cache(
    config: Any,
    kind: str,
    batch: int,
    context: int,
    max_len: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
):
    """A KV cache (see new_kv_cache) holding `context` random keys and values in every layer, as if
    `context` tokens had been seen: decoding after it attends to all of them."""
    cache = new_kv_cache(config, kind, max_len)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (batch, config.num_key_value_heads, context, head_dim)
    generator = torch.Generator(device=device).manual_seed(seed)
    for layer in range(config.num_hidden_layers):
        keys = torch.randn(shape, dtype=dtype, device=device, generator=generator)
        values = torch.randn(shape, dtype=dtype, device=device, generator=generator)
        cache.update(keys, values, layer)
        del keys, values
    return cache


def _mixer_state_bytes(cache: Any) -> int:
    from zoo.cache import MixerStateLayer, state_bytes

    return sum(state_bytes(layer.state) for layer in cache.layers if isinstance(layer, MixerStateLayer))


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


#: greedy steps decoded untimed before the timed ones (a first call's set-up is not decoding speed)
WARMUP_STEPS = 1


def _decode(model: Any, token: torch.Tensor, cache: Any, steps: int) -> tuple[Any, torch.Tensor]:
    """`steps` greedy steps, one token per sequence, each fed the previous step's argmax; returns the cache
    and the next token to feed."""
    from zoo.cache import CACHE_ARG

    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, **{CACHE_ARG: cache})
        cache, token = getattr(out, CACHE_ARG), out.logits[:, -1:].argmax(-1)
    return cache, token


def _make_context(model: Any, cell: dict, args: argparse.Namespace, device: torch.device):
    """The cache after the cell's context and the first token to decode: (cache, token, fields)."""
    from zoo.cache import CACHE_ARG

    B, C = cell["batch"], cell["context"]
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(args.seed)
    max_len = C + WARMUP_STEPS + cell["new_tokens"]
    teacher = cell["kind"] == "teacher"
    if teacher and args.context_fill == "synthetic":
        dtype = model.get_input_embeddings().weight.dtype
        cache = random_kv_cache(model.config, args.teacher_cache, B, C, max_len, dtype, device, args.seed)
        token = torch.randint(vocab, (B, 1), generator=generator).to(device)
        made_by = f"random KV cache of {C} tokens per layer (no prefill, nothing timed before decoding)"
        return cache, token, {"context_made_by": made_by, "prefill_tokens": 0, "prefill_seconds": None}
    prefill = C
    if args.context_fill == "synthetic" and cell["softmax_layers"] == 0:
        prefill = min(C, args.synthetic_prefill)
    cache = new_kv_cache(model.config, args.teacher_cache, max_len) if teacher else None
    ids = torch.randint(vocab, (B, prefill), generator=generator).to(device)
    seconds, out = _timed(
        lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1, **{CACHE_ARG: cache}), device
    )
    made_by = f"prefill of {C} random tokens"
    if args.context_fill == "synthetic" and not teacher and prefill == C and cell["softmax_layers"]:
        made_by += f" (its {cell['softmax_layers']} softmax layers' KV cache grows with C: no shortcut)"
    fields = {"context_made_by": made_by, "prefill_tokens": prefill, "prefill_seconds": seconds}
    return getattr(out, CACHE_ARG), out.logits[:, -1:].argmax(-1), fields


def _constant_state_note(prefill: int, context: int, before: int, after: int) -> str:
    """How a linearized model's short prefill stands for a context of `context` tokens, in words."""
    if before == after:
        return (
            f"prefill of {prefill} random tokens, constant state (the mixer state's bytes are the same "
            f"after the first decoded token and after the last: decoding costs the same at context {context})"
        )
    return (
        f"prefill of {prefill} random tokens; the mixer state changed size while decoding, so it is not "
        f"shown constant: this cell measures context {prefill}, not {context}"
    )


def _decode_step_name(lean_steps: int, steps: int) -> str:
    """Which forward decoded a cell's timed tokens: zoo's lean step (zoo.lean_decode), transformers'
    forward, or some of each."""
    if lean_steps == steps:
        return "zoo.lean_decode"
    return "transformers' forward" if lean_steps == 0 else f"zoo.lean_decode for {lean_steps} of {steps}"


@torch.no_grad()
def run_cell(model: Any, cell: dict, args: argparse.Namespace) -> dict:
    """Make the cell's context, then time its greedy decoding; returns the measured fields."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cache, token, fields = _make_context(model, cell, args, device)
    shortcut = fields["prefill_tokens"] not in (0, cell["context"])  # a linearized model's short prefill
    cache, token = _decode(model, token, cache, WARMUP_STEPS)
    # after the warm-up step: the first decoded token may give a state its decoding room (zoo's in-place
    # window step), which stays the same size from there on
    before = _mixer_state_bytes(cache) if shortcut else None
    from zoo import lean_decode

    lean_before = lean_decode.steps_taken()
    seconds, (cache, _) = _timed(lambda: _decode(model, token, cache, cell["new_tokens"]), device)
    fields["decode_step"] = _decode_step_name(lean_decode.steps_taken() - lean_before, cell["new_tokens"])
    if shortcut:
        after = _mixer_state_bytes(cache)
        fields["context_made_by"] = _constant_state_note(
            fields["prefill_tokens"], cell["context"], before, after
        )
        fields.update(mixer_state_bytes_after_warmup=before, mixer_state_bytes_after_decode=after)
    from zoo.decode_cost import cache_state_bytes

    state = cache_state_bytes(cache)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = state + sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    fields.update(
        status="ok",
        decode_seconds=seconds,
        decode_tokens_per_s=cell["batch"] * cell["new_tokens"] / seconds,
        cache_tokens_after_decode=int(cache.get_seq_length()),
        state_bytes=state,
        peak_memory_bytes=int(peak),
    )
    return fields


class _Guard:
    """Skips a cell no smaller (batch and context) than one of the same model that ran out of memory or
    took longer than --max-seconds, or whose time, estimated linearly in batch x tokens from the largest
    smaller cell measured, exceeds --max-seconds."""

    def __init__(self, max_seconds: float):
        self.max_seconds = max_seconds
        self.measured: dict[str, list[tuple[dict, float]]] = {}
        self.failed: dict[str, list[tuple[dict, str]]] = {}

    @staticmethod
    def _size(cell: dict, synthetic_prefill: int, fill: str) -> float:
        context = cell["context"]
        if fill == "synthetic" and cell["kind"] == "linearized" and cell["softmax_layers"] == 0:
            context = min(context, synthetic_prefill)
        return cell["batch"] * (context + WARMUP_STEPS + cell["new_tokens"])

    def reason_to_skip(self, cell: dict, args: argparse.Namespace) -> str | None:
        model, B, C = cell["model"], cell["batch"], cell["context"]
        for other, why in self.failed.get(model, []):
            if B >= other["batch"] and C >= other["context"]:
                return f"no smaller than B={other['batch']}, C={other['context']}, which {why}"
        smaller = [(o, s) for o, s in self.measured.get(model, []) if o["batch"] <= B and o["context"] <= C]
        if not smaller:
            return None

        def size(c: dict) -> float:
            return self._size(c, args.synthetic_prefill, args.context_fill)

        other, seconds = max(smaller, key=lambda item: size(item[0]))
        estimate = seconds * size(cell) / size(other)
        if estimate > self.max_seconds:
            return (
                f"estimated {estimate:.3g} s (from {seconds:.3g} s at B={other['batch']}, "
                f"C={other['context']}) > --max-seconds"
            )
        return None

    def record(self, cell: dict) -> None:
        if cell["status"] == "ok":
            seconds = (cell["prefill_seconds"] or 0.0) + cell["decode_seconds"]
            self.measured.setdefault(cell["model"], []).append((cell, seconds))
            if seconds > self.max_seconds:
                self.failed.setdefault(cell["model"], []).append((cell, f"took {seconds:.3g} s"))
        elif cell["status"] == "oom":
            self.failed.setdefault(cell["model"], []).append((cell, "ran out of memory"))


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _run_form_cells(model, cells: list[dict], args, guard: _Guard, deadline: float | None, save, log) -> None:
    device = torch.device(args.device)
    for cell in cells:
        if cell["status"] != "planned":
            log(_progress_line(cell))
            continue
        reason = guard.reason_to_skip(cell, args)
        if reason is None and deadline is not None and time.monotonic() > deadline:
            reason = "time cap reached"
        if reason is not None:
            cell.update(status="skipped", reason=reason)
        else:
            try:
                cell.update(run_cell(model, cell, args))
            except Exception as err:  # noqa: BLE001 - one failing cell must not end the sweep; it says why
                oom = is_out_of_memory(err)
                cell.update(status="oom" if oom else "error", reason=_one_line(err))
            _free_memory(device)
            guard.record(cell)
        log(_progress_line(cell))
        save()


def _warm_up(model, form: ModelForm, args: argparse.Namespace) -> None:
    """One small untimed cell: the kernels' first-call costs land here, not in the first timed cell."""
    cell = {
        "kind": form.kind,
        "batch": 1,
        "context": 8,
        "new_tokens": 2,
        "softmax_layers": form.softmax_layers,
    }
    run_cell(model, cell, args)


def run_generate_bench(
    args: argparse.Namespace,
    log=print,
    *,
    forms: Sequence[ModelForm] | None = None,
    deadline: float | None = None,
) -> dict:
    """Run every cell; return the results (also written to --out/results.json after each cell, so a run
    killed midway keeps what it measured). `forms` replaces the models of --model (e.g. a random-weight
    model built on the GPU; --model then only names it); cells not started by the time.monotonic()
    `deadline` are recorded as skipped."""
    args = _resolve(args, check_model=forms is None)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    forms = list(forms) if forms is not None else _model_forms(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = plan_cells(
        forms, args.contexts, args.batches, args.new_tokens, args.context_fill, dtype, args.memory_limit_bytes
    )
    results = _results_header(args, forms, device)
    results["cells"] = cells

    def save() -> None:
        write_json(out_dir / "results.json", results)

    save()
    guard = _Guard(args.max_seconds)
    for form in forms:
        todo = [cell for cell in cells if cell["model"] == form.name]
        model = None
        if deadline is not None and time.monotonic() > deadline:
            for cell in todo:
                if cell["status"] == "planned":
                    cell.update(status="skipped", reason="time cap reached")
        if any(cell["status"] == "planned" for cell in todo):
            log(f"{form.name}: building the model")
            try:
                model = form.build()
                _warm_up(model, form, args)
            except Exception as err:  # noqa: BLE001 - recorded in each of its cells
                model = None
                reason = f"the model could not be built or warmed up: {_one_line(err)}"
                status = "oom" if is_out_of_memory(err) else "error"
                for cell in todo:
                    if cell["status"] == "planned":
                        cell.update(status=status, reason=reason)
                _free_memory(device)
        _run_form_cells(model, todo, args, guard, deadline, save, log)
        del model
        _free_memory(device)
    save()
    return results


def _results_header(args: argparse.Namespace, forms: Sequence[ModelForm], device: torch.device) -> dict:
    return {
        "bench": "generate",
        "command": command_line(args),
        "argv": sys.argv,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": str(args.model),
        "device": {"type": device.type, "name": device_name(device)},
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "versions": library_versions(),
        "cpu_c_kernels": native.status() if device.type == "cpu" else None,
        "context_fill": args.context_fill,
        "context_fill_means": CONTEXT_FILLS[args.context_fill],
        "synthetic_prefill": args.synthetic_prefill,
        "teacher_cache": args.teacher_cache,
        "contexts": args.contexts,
        "batches": args.batches,
        "new_tokens": args.new_tokens,
        "warmup_steps": WARMUP_STEPS,
        "max_seconds": args.max_seconds,
        "memory_limit_bytes": args.memory_limit_bytes,
        "memory_limit_source": args.memory_limit_source,
        "memory_method": (
            "CUDA: torch.cuda.max_memory_allocated over the cell (weights included)"
            if device.type == "cuda"
            else "CPU, not measured: cache/state bytes + weight bytes (a floor: activations not counted)"
        ),
        "timing": "prefill timed apart; decode: all new tokens, timed as a whole, synchronized",
        "models": [
            {"name": form.name, "kind": form.kind, "softmax_layers": form.softmax_layers} for form in forms
        ],
    }


def _progress_line(cell: dict) -> str:
    head = f"  {cell['model']:<24} C={cell['context']:<7} B={cell['batch']:<4}"
    if cell["status"] != "ok":
        return f"{head} {cell['status']}: {cell['reason']}"
    prefill = "" if cell["prefill_seconds"] is None else f"prefill {cell['prefill_seconds']:.3g} s, "
    return f"{head} {prefill}decode {cell['decode_tokens_per_s']:,.1f} tok/s"


def main(args: argparse.Namespace) -> int:
    from zoo.bench.generate_report import write_report

    print(f"zoo bench generate: writing to {args.out or 'bench-generate-<device>'}", flush=True)
    results = run_generate_bench(args, log=lambda line: print(line, flush=True))
    paths = write_report(results, args.out)  # run_generate_bench resolved args.out
    print("wrote " + ", ".join(str(p) for p in [Path(args.out) / "results.json", *paths]))
    return 0
