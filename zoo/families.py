"""The model families zoo converts, and what it knows of the embedded teacher without loading it."""

from __future__ import annotations

#: Hugging Face `model_type`s whose attention zoo.linearize can swap
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

#: the config.json fields the run's preflight reads, for each embedded teacher (SmolLM2-135M-Instruct)
EMBEDDED_CONFIGS = {
    "smollm2-135m": {
        "model_type": "llama",
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_size": 576,
        "head_dim": 64,
    },
}
