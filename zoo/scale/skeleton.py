"""Partial models: the whole model built on the meta device (no memory), with only the parts a rank
needs (a block of decoder layers, the embeddings) read from the checkpoint's safetensors files.

This is what keeps a rank's memory to one block: training block 7 of Llama 3.1 405B needs its 9
layers (about 58 GB in bf16), not the 810 GB model. Layers a rank does not hold are `SkippedLayer`s
that pass the hidden states through, so the family's own forward (masks, RoPE, per-layer sliding
windows) still runs unchanged and a block can be fed stored hidden states as `inputs_embeds`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


def checkpoint_folder(name_or_path: str) -> Path:
    """The local folder holding the model's config and safetensors: an embedded name (materialized
    once), a local folder, or a hub id (downloaded with huggingface_hub, config and weights only)."""
    from zoo.teacher import resolve_teacher_path

    path = Path(resolve_teacher_path(name_or_path))
    if path.is_dir():
        return path
    if "/" not in name_or_path or name_or_path.startswith((".", "/")):
        raise FileNotFoundError(f"no model folder at {name_or_path!r} (and it is not a hub id owner/name)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))


class CheckpointReader:
    """Tensors of a Hugging Face safetensors checkpoint by name, read on demand (one file or an index)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of = {key: self.folder / name for key, name in weight_map.items()}
        elif single.is_file():
            with safe_open(str(single), "pt") as f:
                self.file_of = {key: single for key in f.keys()}
        else:
            raise FileNotFoundError(
                f"{self.folder} has neither model.safetensors nor model.safetensors.index.json "
                "(only safetensors checkpoints are read)"
            )

    def load_into(self, module: nn.Module, prefix: str, device: torch.device | str) -> None:
        """Materialize `module` (built on the meta device) on `device` from the tensors named
        `prefix + <its state-dict key>`, cast to the module's own dtypes."""
        module.to_empty(device=device)
        targets = module.state_dict(keep_vars=True)
        missing = [prefix + name for name in targets if prefix + name not in self.file_of]
        if missing:
            raise KeyError(
                f"{self.folder}: the checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            )
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in targets:
            by_file[self.file_of[prefix + name]].append(name)
        with torch.no_grad():
            for path, names in by_file.items():
                with safe_open(str(path), "pt") as f:
                    for name in names:
                        targets[name].copy_(f.get_tensor(prefix + name))


class SkippedLayer(nn.Module):
    """Stands in for a decoder layer this process does not hold: the hidden states pass through."""

    self_attn = None  # not a converted attention (zoo.transfer.stage1.converted_attention looks here)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def skeleton(folder: str | Path, dtype: torch.dtype) -> nn.Module:
    """The model of `folder`'s config on the meta device: structure only, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()


def partial_model(
    reader: CheckpointReader,
    dtype: torch.dtype,
    layers: range,
    device: torch.device | str,
    embeddings: bool = False,
) -> nn.Module:
    """A model holding only decoder `layers` (and the token embeddings if asked) on `device`; the
    other layers are `SkippedLayer`s, the rest stays on the meta device."""
    model = skeleton(reader.folder, dtype)
    decoder = model.model
    for i in range(len(decoder.layers)):
        if i in layers:
            reader.load_into(decoder.layers[i], f"model.layers.{i}.", device)
        else:
            decoder.layers[i] = SkippedLayer()
    if embeddings:
        reader.load_into(decoder.embed_tokens, "model.embed_tokens.", device)
    decoder.rotary_emb = type(decoder.rotary_emb)(model.config).to(
        device
    )  # its buffers are not in checkpoints
    return model


class _Captured(Exception):
    def __init__(self, output: torch.Tensor):
        self.output = output


@torch.no_grad()
def run_layers(model: nn.Module, hidden: torch.Tensor, last: int) -> torch.Tensor:
    """Feed `hidden` [B, T, hidden] to the decoder as its input and return what leaves layer `last`
    (the layers before the ones held are skipped). Causal, no padding, positions 0..T-1."""

    def capture(module, args, output):
        raise _Captured(output[0] if isinstance(output, tuple) else output)

    handle = model.model.layers[last].register_forward_hook(capture)
    try:
        model.model(inputs_embeds=hidden, use_cache=False)
    except _Captured as done:
        return done.output
    finally:
        handle.remove()
    raise RuntimeError(f"layer {last} was never reached")
