"""What a model's layers cost, from its config alone: parameter counts (the model built on the meta
device, no memory) and the activation bytes stage 1 keeps per token (measured on the CPU at the
layer's real shapes). Models come from presets, a config.json or model folder, or a hub id."""

from __future__ import annotations

import torch

# from each model's config.json on the Hugging Face hub
PRESETS = {
    "Llama-3-8B": (
        "llama",
        "meta-llama/Meta-Llama-3-8B",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=8192,
            rope_theta=500000.0,
        ),
    ),
    "Llama-3.1-70B": (
        "llama",
        "meta-llama/Llama-3.1-70B",
        dict(
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=131072,
            rope_theta=500000.0,
        ),
    ),
    "Llama-3.1-405B": (
        "llama",
        "meta-llama/Llama-3.1-405B",
        dict(
            hidden_size=16384,
            intermediate_size=53248,
            num_hidden_layers=126,
            num_attention_heads=128,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=131072,
            rope_theta=500000.0,
        ),
    ),
    "Mistral-7B": (
        "mistral",
        "mistralai/Mistral-7B-v0.1",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
            max_position_embeddings=32768,
            rope_theta=10000.0,
            sliding_window=4096,
        ),
    ),
}


def load_config(spec: str):
    """A transformers config from a preset name, a config.json (or a folder holding one) or a hub id."""
    from pathlib import Path

    from transformers import AutoConfig, LlamaConfig, MistralConfig

    presets = {name.lower(): name for name in PRESETS}
    if spec.lower() in presets:
        family, _, values = PRESETS[presets[spec.lower()]]
        return {"llama": LlamaConfig, "mistral": MistralConfig}[family](**values)
    path = Path(spec)
    if path.is_file():
        return AutoConfig.from_pretrained(path.parent if path.name == "config.json" else path)
    if path.is_dir() or ("/" in spec and not spec.startswith((".", "/"))):
        return AutoConfig.from_pretrained(spec)
    raise ValueError(
        f"unknown model {spec!r}: not a preset ({', '.join(PRESETS)}), not a config.json or "
        "model folder, and not a hub id owner/name"
    )


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def count_parameters(config, mixer: str, options: dict) -> dict:
    """Exact parameter counts from the model built on the meta device (no memory)."""
    import copy

    from transformers import AutoModelForCausalLM

    import zoo

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
        zoo.linearize(model, mixer, layers=[0], **options)
    layer = model.model.layers[0]
    mixer_params = sum(p.numel() for p in layer.self_attn.mixer.parameters())
    return {
        "total": sum(p.numel() for n, p in model.named_parameters() if ".mixer." not in n),
        "layer": sum(p.numel() for n, p in layer.named_parameters() if ".mixer." not in n),
        "o_proj": layer.self_attn.o_proj.weight.numel(),
        "mixer_per_layer": mixer_params,
    }


@torch.no_grad()
def _zero(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.zero_()


def activation_bytes_per_token(config, mixer: str, options: dict, dtype: torch.dtype, tokens: int) -> float:
    """Bytes autograd keeps per token for one converted layer in stage 1, measured on the CPU with
    this model's layer shapes (zero weights) over `tokens` tokens; parameters are not counted."""
    import copy

    from transformers import AutoModelForCausalLM

    from zoo.convert import LinearizedAttention, teacher_forced
    from zoo.mixers.base import build_mixer

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            copy.deepcopy(config), dtype=dtype, attn_implementation="sdpa"
        )
    attn = model.model.layers[0].self_attn.to_empty(device="cpu")
    _zero(attn)
    mix = build_mixer(
        mixer,
        config.num_attention_heads,
        config.num_key_value_heads,
        head_dim(config),
        config.hidden_size,
        0,
        **options,
    ).to(dtype=dtype)
    mix.init_from_teacher(attn.q_proj, attn.k_proj, attn.v_proj)
    wrapper = LinearizedAttention(attn, mix)
    for name, p in wrapper.named_parameters():
        p.requires_grad_(".mixer." in f".{name}")
    weights = {p.untyped_storage().data_ptr() for p in wrapper.parameters()}
    x = torch.zeros(1, tokens, config.hidden_size, dtype=dtype)
    rotary = type(model.model.rotary_emb)(config)
    position = rotary(x, torch.arange(tokens)[None])
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with (
        teacher_forced(wrapper),
        torch.enable_grad(),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        wrapper(x, position_embeddings=position)
    return sum(kept.values()) / tokens
