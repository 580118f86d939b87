"""`zoo plan`: what block-wise linearization of a model costs before any GPU is rented.

    zoo plan Llama-3.1-405B --block-size 9 --tokens 50M --gpu H100-80GB

For a model (a preset below, a local config.json or model folder, or a hub id), a block size k, a
token budget and a GPU type it prints:

- disk for the hidden-state store: bytes per element x stored layers (ceil(L / k): the input of
  each block) x tokens x hidden size. Llama 3.1 405B, bf16, 50M tokens: 2 x 126 x 50e6 x 16384 =
  206 TB at k = 1 and 2 x 14 x 50e6 x 16384 = 22.9 TB at k = 9 (the LoLCATs blog's "200 TB" and
  "22 TB": it counts one hidden-state vector per token per stored layer, as here);
- memory per block on one GPU in stage 1: the block's teacher weights, its mixers' weights, grads
  and AdamW moments (counted exactly on the meta device), the activations autograd keeps (measured
  on this machine's CPU for one layer at up to 256 tokens and scaled linearly to the sequence
  length) and one layer's MLP forward;
- how many GPUs train in parallel (one block each) and the nodes of 8 that makes;
- a time estimate: FLOPs (formulas below) over ASSUMED throughput, the GPU's dense bf16 peak from
  its vendor datasheet times an assumed utilization (default 40%). Nothing here was measured on a
  GPU; pass --mfu or --tflops with your own measurement.

FLOPs per token and layer: the frozen teacher forward 2 P_layer + 2 T H D (causal attention, T the
sequence length), the student's o_proj forward and input-gradient 4 P_o, the mixer forward and
backward 6 P_mixer (its recurrent state updates, under 1% at these sizes, are left out).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from zoo.scale.model_costs import PRESETS, activation_bytes_per_token, count_parameters, head_dim, load_config


@dataclass(frozen=True)
class GPU:
    memory_gb: float  # vendor nominal, GB
    bf16_tflops: float  # dense (no sparsity) bf16 tensor-core peak, TFLOP/s
    source: str


GPUS = {
    "A100-40GB": GPU(40, 312, "NVIDIA A100 datasheet (SXM): 312 TFLOP/s dense bf16"),
    "A100-80GB": GPU(80, 312, "NVIDIA A100 datasheet (SXM): 312 TFLOP/s dense bf16"),
    "H100-80GB": GPU(80, 989, "NVIDIA H100 datasheet (SXM): 989 TFLOP/s dense bf16 (1979 with sparsity)"),
    "H200-141GB": GPU(141, 989, "NVIDIA H200 datasheet (SXM): 989 TFLOP/s dense bf16 (1979 with sparsity)"),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_MFU = 0.40  # an assumption, not a measurement: stated wherever it is used
FREE_FRACTION = 0.10  # of GPU memory kept free (CUDA context, allocator): an assumption
GPUS_PER_NODE = 8


@dataclass
class PlanInputs:
    model: str
    block_size: int
    tokens: int
    seq_len: int = 1024
    batch_size: int = 1  # sequences per step on one GPU
    dtype: str = "bfloat16"
    mixer: str = "lolcats"
    options: dict | None = None
    gpu: str = "H100-80GB"
    mfu: float = DEFAULT_MFU
    tflops: float | None = None  # sustained TFLOP/s you measured: replaces peak x mfu
    activations: bool = True  # measure activation memory on the CPU (a few seconds for 405B shapes)


def _block_memory(
    k: int, params: dict, element: int, act_per_token: float | None, inputs: PlanInputs, config
) -> dict:
    tokens = inputs.batch_size * inputs.seq_len
    memory = {
        "teacher_weights": k * params["layer"] * element,
        "mixer_training_state": k
        * params["mixer_per_layer"]
        * element
        * 4,  # weights, grads, 2 AdamW moments
        "saved_activations": None if act_per_token is None else k * act_per_token * tokens,
        "block_inputs_and_one_mlp": tokens * element * (config.hidden_size + 3 * config.intermediate_size),
    }
    memory["total"] = sum(v for v in memory.values() if v is not None)
    return memory


def check_inputs(inputs: PlanInputs) -> None:
    """A one-line ValueError (KeyError for an unknown mixer) naming the flag of the first impossible input."""
    from zoo.mixers import get_mixer

    for flag, value in (
        ("--block-size", inputs.block_size),
        ("--tokens", inputs.tokens),
        ("--seq-len", inputs.seq_len),
        ("--batch-size", inputs.batch_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be a whole number >= 1, got {value!r}")
    if not 0 < inputs.mfu <= 1:  # also refuses NaN
        raise ValueError(f"--mfu must be a fraction in (0, 1], got {inputs.mfu:g}")
    if inputs.tflops is not None and not 0 < inputs.tflops < math.inf:
        raise ValueError(f"--tflops must be a number > 0 (measured TFLOP/s per GPU), got {inputs.tflops:g}")
    if inputs.gpu not in GPUS:
        raise ValueError(f"unknown GPU {inputs.gpu!r}; known: {', '.join(GPUS)}")
    if inputs.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {inputs.dtype!r}; allowed: {', '.join(DTYPES)}")
    get_mixer(inputs.mixer).check_options(dict(inputs.options or {}))


def make_plan(inputs: PlanInputs) -> dict:
    """Every number `zoo plan` prints, as a dict (bytes, seconds, FLOPs)."""
    from zoo.scale.blockwise import plan_blocks

    check_inputs(inputs)
    config = load_config(inputs.model)
    options = dict(inputs.options or {})
    dtype = DTYPES[inputs.dtype]
    element = torch.empty((), dtype=dtype).element_size()
    layers = config.num_hidden_layers
    blocks = plan_blocks(layers, inputs.block_size, list(range(layers)))
    params = count_parameters(config, inputs.mixer, options)
    gpu = GPUS[inputs.gpu]
    probe = min(inputs.seq_len, 256)
    act = (
        activation_bytes_per_token(config, inputs.mixer, options, dtype, probe)
        if inputs.activations
        else None
    )
    memory = _block_memory(inputs.block_size, params, element, act, inputs, config)
    usable = gpu.memory_gb * 1e9 * (1 - FREE_FRACTION)
    largest_fit = next(
        (
            k
            for k in range(min(inputs.block_size, layers), 0, -1)
            if _block_memory(k, params, element, act, inputs, config)["total"] <= usable
        ),
        0,
    )
    heads, dim = config.num_attention_heads, head_dim(config)
    attention = 2 * inputs.seq_len * heads * dim
    teacher_flops = 2 * params["layer"] + attention
    stage1_flops = teacher_flops + 4 * params["o_proj"] + 6 * params["mixer_per_layer"]
    rate = (inputs.tflops if inputs.tflops is not None else gpu.bf16_tflops * inputs.mfu) * 1e12
    gpus = len(blocks)
    stored = len(blocks)
    return {
        "model": inputs.model,
        "layers": layers,
        "hidden_size": config.hidden_size,
        "heads": heads,
        "kv_heads": config.num_key_value_heads,
        "parameters": params["total"],
        "parameters_per_layer": params["layer"],
        "mixer": inputs.mixer,
        "mixer_options": options,
        "mixer_parameters_per_layer": params["mixer_per_layer"],
        "block_size": inputs.block_size,
        "blocks": len(blocks),
        "last_block_layers": blocks[-1].stop - blocks[-1].start,
        "tokens": inputs.tokens,
        "seq_len": inputs.seq_len,
        "batch_size": inputs.batch_size,
        "dtype": inputs.dtype,
        "bytes_per_element": element,
        "stored_layers": stored,
        "store_bytes": element * stored * inputs.tokens * config.hidden_size,
        "activation_bytes_per_token_layer": act,
        "activation_probe_tokens": probe if act is not None else None,
        "memory_per_block": memory,
        "gpu": inputs.gpu,
        "gpu_memory_bytes": gpu.memory_gb * 1e9,
        "fits": memory["total"] <= usable,
        "largest_block_that_fits": largest_fit,
        "gpus": gpus,
        "nodes": math.ceil(gpus / GPUS_PER_NODE),
        "flops_per_token_layer_stage1": stage1_flops,
        "flops_per_token_layer_teacher": teacher_flops,
        "throughput_flops": rate,
        "throughput_source": (
            f"given: {inputs.tflops} TFLOP/s"
            if inputs.tflops is not None
            else f"ASSUMED: {gpu.bf16_tflops:g} TFLOP/s peak ({gpu.source}) x {inputs.mfu:.0%} "
            "utilization (an assumption, not measured)"
        ),
        "seconds_store": inputs.tokens * layers * teacher_flops / (rate * gpus),
        "seconds_stage1_per_block": inputs.tokens * inputs.block_size * stage1_flops / rate,
        "stage2_weight_bytes_per_gpu": params["total"] * element / gpus,
    }


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def render(plan: dict) -> str:
    """The plan as the text `zoo plan` prints."""
    m = plan["memory_per_block"]
    k, b = plan["block_size"], plan["blocks"]
    act = plan["activation_bytes_per_token_layer"]
    act_line = (
        "not measured (--no-activations)"
        if act is None
        else f"{_size(m['saved_activations'])}   measured on this CPU: {act / 1e6:.2f} MB per token per "
        "layer "
        f"at {plan['activation_probe_tokens']} tokens, scaled to {plan['seq_len']}"
    )
    fit = (
        f"fits one {plan['gpu']} ({plan['gpu_memory_bytes'] / 1e9:.0f} GB, {FREE_FRACTION:.0%} kept free)"
        if plan["fits"]
        else f"does NOT fit one {plan['gpu']} ({plan['gpu_memory_bytes'] / 1e9:.0f} GB, {FREE_FRACTION:.0%} "
        "kept free); "
        f"largest block that fits: {plan['largest_block_that_fits']} layers"
    )
    options = ", ".join(f"{key}={v}" for key, v in plan["mixer_options"].items()) or "defaults"
    lines = [
        f"{plan['model']}: {plan['layers']} layers, hidden {plan['hidden_size']}, {plan['heads']} heads "
        f"({plan['kv_heads']} KV), {plan['parameters'] / 1e9:.1f}B parameters "
        f"({plan['parameters_per_layer'] / 1e9:.2f}B "
        f"per layer)",
        f"mixer {plan['mixer']} ({options}): {plan['mixer_parameters_per_layer'] / 1e6:.2f}M parameters per "
        "layer",
        f"block size {k}: {b} blocks ({plan['layers']} layers; the last block has "
        f"{plan['last_block_layers']})",
        "",
        "hidden-state store (the input of each block, written once)",
        f"  {plan['bytes_per_element']} B x {plan['stored_layers']} layers x {plan['tokens']:,} tokens x "
        f"{plan['hidden_size']} = {plan['store_bytes'] / 1e12:.1f} TB ({plan['store_bytes'] / 2**40:.1f} "
        "TiB)",
        "",
        f"memory per block on one GPU (stage 1, {plan['batch_size']} x {plan['seq_len']} tokens per step, "
        f"{plan['dtype']})",
        f"  teacher weights of {k} layer(s)  {_size(m['teacher_weights'])}",
        f"  mixers: weights, grads, AdamW   {_size(m['mixer_training_state'])}",
        f"  saved activations               {act_line}",
        f"  block inputs + one MLP forward  {_size(m['block_inputs_and_one_mlp'])}",
        f"  total                           {_size(m['total'])}: {fit}",
        "",
        f"GPUs in parallel: {plan['gpus']} (one block each), {plan['nodes']} node(s) of {GPUS_PER_NODE}",
        "",
        f"time, from {plan['throughput_source']}",
        f"  store (teacher forward, {plan['gpus']} GPUs)    {_hours(plan['seconds_store'])}",
        f"  stage 1 (each block, in parallel)  {_hours(plan['seconds_stage1_per_block'])}   "
        f"({plan['flops_per_token_layer_stage1'] / 1e9:.2f} GFLOP per token per layer)",
        f"stage 2 (FSDP2 LoRA over the {plan['gpus']} GPUs): {_size(plan['stage2_weight_bytes_per_gpu'])} of "
        "weights "
        "per GPU, activations not included",
    ]
    return "\n".join(lines)


def _tokens(text: str) -> int:
    """50M, 2.5B, 20_000_000, 1e6 -> int."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9}.get(text[-1:].lower(), 1)
    try:
        return int(float((text[:-1] if scale != 1 else text).replace("_", "")) * scale)
    except (ValueError, OverflowError):  # OverflowError: inf
        raise ValueError(f"--tokens {text!r} is not a count (e.g. 50M, 2.5B, 20000000)") from None


def add_arguments(parser) -> None:
    parser.add_argument(
        "model", help=f"a preset ({', '.join(PRESETS)}), a config.json or model folder, or a hub id"
    )
    parser.add_argument(
        "--block-size", "-k", type=int, default=9, help="layers per block (default 9, as LoLCATs for 405B)"
    )
    parser.add_argument("--tokens", default="50M", help="stage-1 tokens, all stored (default 50M)")
    parser.add_argument("--gpu", default="H100-80GB", help=f"one of {', '.join(GPUS)} (default H100-80GB)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step on one GPU (default 1)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--mixer", default="lolcats")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a mixer option (repeatable), e.g. --option window=64 --option feature_dim=64",
    )
    parser.add_argument(
        "--mfu",
        type=float,
        default=DEFAULT_MFU,
        help=f"assumed fraction of the GPU's peak reached (default {DEFAULT_MFU})",
    )
    parser.add_argument(
        "--tflops", type=float, help="your measured sustained TFLOP/s per GPU (replaces peak x mfu)"
    )
    parser.add_argument("--no-activations", action="store_true", help="skip measuring activation memory")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _options(pairs: list[str]) -> dict:
    import yaml

    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--option {pair!r} is not KEY=VALUE")
        key, value = pair.split("=", 1)
        options[key.strip()] = yaml.safe_load(value)
    return options


def main(args) -> int:
    plan = make_plan(
        PlanInputs(
            model=args.model,
            block_size=args.block_size,
            tokens=_tokens(args.tokens),
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            dtype=args.dtype,
            mixer=args.mixer,
            options=_options(args.option),
            gpu=args.gpu,
            mfu=args.mfu,
            tflops=args.tflops,
            activations=not args.no_activations,
        )
    )
    print(json.dumps(plan, indent=2) if args.json else render(plan))
    return 0
