"""summary.json: what a run reports, built from its progress record."""

from __future__ import annotations

from zoo.devices import describe_device, pick_device, versions
from zoo.recipe import Recipe


def stage1_worse_than_swap(progress: dict) -> str | None:
    """A warning when stage 1 ended with a higher held-out perplexity than the untrained swap (None
    otherwise)."""
    swap, stage1 = progress.get("swap"), progress.get("stage1")
    if not (swap and stage1 and "heldout" in swap and "heldout" in stage1):
        return None
    before, after = swap["heldout"]["ppl"], stage1["heldout"]["ppl"]
    if after > before:
        return (
            f"stage 1 ended worse than the untrained swap (held-out perplexity {after:.2f} > {before:.2f}): "
            "its training hurt; try a lower stage1.lr or more stage1.tokens"
        )
    return None


def _ppl_pair(entry: dict | None) -> dict | None:
    if entry is None:
        return None
    return {
        "heldout": entry["heldout"]["ppl"],
        "ood": entry["ood"]["ppl"] if entry.get("ood") else None,
        "bpb_heldout": entry["heldout"]["bpb"],
        "bpb_ood": entry["ood"]["bpb"] if entry.get("ood") else None,
        "per_source": {s: {"ppl": r["ppl"], "bpb": r["bpb"]} for s, r in entry["per_source"].items()},
    }


def _mean(values: dict | None) -> float | None:
    return sum(values.values()) / len(values) if values else None


def _branches(entry: dict | None) -> dict | None:
    if entry is None:
        return None
    return {branch: {"ppl": _ppl_pair(r), "passkey": r.get("passkey")} for branch, r in entry.items()}


def _long_context(entry: dict | None, recipe: Recipe) -> dict | None:
    """The long-context rows (teacher, free window, final model) with the share of the gap each closes."""
    if entry is None:
        return None
    from zoo.long_context import free_window_of, long_context_table

    teacher = entry["teacher"]
    rows = {"teacher": teacher["teacher"], "free_window": teacher["free_window"]}
    if teacher.get("fair_reference"):
        rows["fair_reference"] = teacher["fair_reference"]
    return long_context_table(
        rows | {"final": entry["final"]}, free_window_of(recipe.mixer.name, recipe.mixer_options())
    )


def build_summary(
    recipe: Recipe, progress: dict, trainable: int, sample: str, wall: float, model_params: int | None = None
) -> dict:
    s1 = progress.get("stage1_train") or {}
    s2 = progress.get("stage2_train") or {}
    return {
        "model": recipe.model.name,
        "mixer": recipe.mixer.name,
        "mixer_options": recipe.mixer_options(),
        "ppl_teacher": _ppl_pair(progress.get("teacher")),
        "ppl_teacher_lora": _ppl_pair(progress.get("teacher_lora")),
        "ppl_swap": _ppl_pair(progress.get("swap")),
        "ppl_stage1": _ppl_pair(progress.get("stage1")),
        "ppl_final": _ppl_pair(progress.get("final")),
        "layer_mse_swap": progress.get("swap", {}).get("layer_mse"),
        "layer_mse_stage1": progress.get("stage1", {}).get("layer_mse"),
        "mean_layer_mse_swap": _mean(progress.get("swap", {}).get("layer_mse")),
        "mean_layer_mse_stage1": _mean(progress.get("stage1", {}).get("layer_mse")),
        "trainable_params": trainable,
        "model_params": model_params,
        "trainable_percent": 100.0 * trainable / model_params if model_params else None,
        "teacher_lora_train": progress.get("teacher_lora_train"),
        "tokens_stage1": s1.get("tokens", 0),
        "tokens_stage2": s2.get("tokens", 0),
        "seconds_stage1": s1.get("seconds", 0.0),
        "seconds_stage2": s2.get("seconds", 0.0),
        "seconds_wall_last_invocation": wall,
        "peak_memory_stage1": s1.get("peak_memory"),
        "peak_memory_stage2": s2.get("peak_memory"),
        "final_loss_stage1": s1.get("final_loss"),
        "final_loss_stage2": s2.get("final_loss"),
        "mmlu": {k: {"accuracy": v["accuracy"], "n": v["n"]} for k, v in progress["mmlu"].items()}
        if "mmlu" in progress
        else None,
        "passkey": progress.get("passkey"),
        "decode": progress.get("decode"),
        "generation": progress.get("generation"),
        "long_context": _long_context(progress.get("long_context"), recipe),
        "warnings": [w for w in (stage1_worse_than_swap(progress),) if w],
        "branches": _branches(progress.get("branches")),
        "prompt": recipe.eval.generate_prompt,
        "sample": sample,
        "teacher_sample": progress.get("teacher_sample"),
        "seed": recipe.seed,
        "device": describe_device(pick_device(recipe.device)),
        "versions": versions(),
    }
