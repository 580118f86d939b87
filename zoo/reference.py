"""The fair reference: the teacher fine-tuned with the same LoRA budget on the same data. Computed once per
(model, data, stage 2, eval blocks, seed) and kept in the zoo cache, `$ZOO_CACHE/references`."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from zoo.atomic import write_json
from zoo.peak_memory import PeakMemory
from zoo.recipe import Recipe, Stage2Config
from zoo.run_data import RunData


def _say(msg: str) -> None:
    print(f"zoo: {msg}", file=sys.stderr, flush=True)


REFERENCE_STAGE2_KEYS = ("tokens", "batch_size", "lr", "weight_decay", "grad_clip", "lr_schedule", "lora")
#: stage-2 keys added later that change the fine-tuned teacher: in the cache key only when set away from their
#: default, so references cached before the key existed stay valid
REFERENCE_STAGE2_KEYS_IF_SET = ("adam_betas", "seq_len")


def teacher_lora_folder(recipe: Recipe) -> tuple[Path, str]:
    """Where the fair reference of `recipe` is kept (one per model, data, stage 2, eval blocks, seed), and its
    key."""
    from zoo.data.cache import cache_dir

    d = recipe.to_dict()
    # only what changes the fine-tuned teacher: new recipe keys (logging, memory savers) must not void the
    # cache
    stage2 = {k: d["stage2"][k] for k in REFERENCE_STAGE2_KEYS}
    default = Stage2Config()
    stage2 |= {
        k: d["stage2"][k] for k in REFERENCE_STAGE2_KEYS_IF_SET if d["stage2"][k] != getattr(default, k)
    }
    key_src = json.dumps(
        {"model": d["model"], "data": recipe.data_key(), "seed": d["seed"]}
        | {"stage2": stage2, "eval": d["eval"]["max_blocks"]},
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    return cache_dir() / "references" / f"teacher-lora-{key}", key_src


def teacher_lora_reference(recipe: Recipe, data: RunData, device, dtype) -> dict:
    """The fair reference: the teacher fine-tuned with the same LoRA budget on the same data.
    Computed once per (model, data, stage 2, eval, seed) and reused from the zoo cache."""
    from zoo.teacher import load_teacher
    from zoo.transfer.stage2 import add_lora, run_stage2

    folder, key_src = teacher_lora_folder(recipe)
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    _say("fair reference: fine-tuning the teacher with the same LoRA budget (computed once, then cached)")
    torch.manual_seed(recipe.seed)
    teacher, _ = load_teacher(recipe.model.name, dtype=dtype, device=str(device))
    s2 = recipe.stage2
    teacher = add_lora(teacher, s2.lora.rank, s2.lora.alpha, s2.lora.dropout, s2.lora.targets)
    with PeakMemory() as peak:
        stats = run_stage2(
            teacher, data.stage_blocks(s2), s2.loop("teacher_lora", recipe.seed), folder, device
        )
    stats |= {
        "peak_memory": peak.result(),
        "trainable_params": sum(p.numel() for p in teacher.parameters() if p.requires_grad),
    }
    result = {"eval": data.evaluate(teacher), "train": stats, "recipe_key": json.loads(key_src)}
    write_json(result_path, result)
    return result


def teacher_lora_weights(recipe: Recipe, data: RunData, device, dtype) -> dict[str, torch.Tensor]:
    """The fair reference's LoRA tensors, by parameter name (the reference is computed first if the
    cache lacks it): what stage 2 distills from with stage2.distill_from=reference."""
    from safetensors.torch import load_file

    teacher_lora_reference(recipe, data, device, dtype)
    folder, _ = teacher_lora_folder(recipe)
    return load_file(
        str(folder / "checkpoints" / "teacher_lora" / "trainable.safetensors"), device=str(device)
    )


def fair_reference_model(recipe: Recipe, data: RunData, device, dtype):
    """The fair reference as a model: the teacher with the cached LoRA of `teacher_lora_reference` (computed
    first if the cache lacks it), in eval mode."""
    from zoo.teacher import load_teacher
    from zoo.transfer.stage2 import add_lora

    weights = teacher_lora_weights(recipe, data, device, dtype)
    teacher, _ = load_teacher(recipe.model.name, dtype=dtype, device=str(device))
    s2 = recipe.stage2
    model = add_lora(teacher, s2.lora.rank, s2.lora.alpha, s2.lora.dropout, s2.lora.targets)
    missing = set(weights) - set(model.state_dict())
    if missing:
        raise RuntimeError(f"the fair reference's LoRA does not fit the teacher: {sorted(missing)[:3]}")
    model.load_state_dict(weights, strict=False)
    return model.eval()
