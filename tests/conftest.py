"""Shared fixtures: tiny random Llama / Mistral / Qwen2 / Qwen3 causal LMs (no network)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(family: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    if family in ("qwen2", "qwen3"):
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    return cls(**kwargs)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), attn_implementation="sdpa")
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
