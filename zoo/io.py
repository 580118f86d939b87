"""Save and load linearized models as Hugging Face folders (safetensors + a config naming the mixers)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from zoo.atomic import atomic_dir, verify_dir
from zoo.convert import register_families
from zoo.devices import keep_device_blocks_whole


def merge_lora(model: nn.Module) -> nn.Module:
    """If `model` is a peft model, merge its LoRA weights and return the plain model; else return it."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


#: what save_linearized writes for a one-file model (an older zoo wrote it without zoo-checksums.json)
SAVED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def save_linearized(model: nn.Module, tokenizer, path: str | os.PathLike, merge: bool = True) -> Path:
    """Write `model` (LoRA merged when `merge`) and `tokenizer` (may be None) to `path`, atomically.

    The folder loads back with `zoo.load_linearized(path)` or, once `zoo.register_families()` has run,
    `AutoModelForCausalLM.from_pretrained(path)`.
    """
    if merge:
        model = merge_lora(model)
    elif hasattr(model, "peft_config"):
        raise ValueError(
            "save_linearized(merge=False) of a peft model: save the adapter with "
            "model.save_pretrained() instead, or merge it"
        )
    path = Path(path)
    with atomic_dir(path, known=SAVED_FILES) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def load_linearized(
    path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | None = None
):
    """Return `(model, tokenizer)` from a folder written by `save_linearized` (tokenizer None if absent).

    The folder's zoo-checksums.json, when it has one, is checked first: a file changed since it was saved
    is a ChecksumError naming it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    register_families()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a saved model folder")
    verify_dir(path)
    keep_device_blocks_whole()  # before transformers' initialization
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", use_safetensors=True)
    if not getattr(model.config, "zoo_mixers", None):
        raise ValueError(f"{path} holds a plain {model.config.model_type} model, not a linearized one")
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    if device:
        model.to(device)
    return model.eval(), tokenizer


#: the folder of a run that holds its final model
FINAL_MODEL_DIR = "model"


def save_run_model(model, tokenizer, out: Path, merge: bool) -> None:
    """model/ holds the linearized model; with merge off, LoRA stays apart in adapter/."""
    if hasattr(model, "peft_config") and not merge:
        model.save_pretrained(out / "adapter")
        model = model.unload()
    save_linearized(model, tokenizer, out / FINAL_MODEL_DIR, merge=True)
