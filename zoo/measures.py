"""What a run measures besides perplexity: MMLU, passkey retrieval, decode speed and state memory,
repeats in greedy generation, and the hybrids' branch ablation. The teacher's MMLU, passkey and
generation scores are computed once per setting and
shared through `$ZOO_CACHE/references` (`cached_reference`), so a bench of many mixers pays for them
once. The teacher's decode speed is a timing: it is measured again in every run, beside the mixer's,
so that both see the same machine load.

`data` below is a `zoo.run_data.RunData` (anything with `evaluate(model)`, `passkey_filler()` and
`generation_documents()`).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from typing import Any

import torch

from zoo.atomic import write_json
from zoo.convert import branch as only_branch
from zoo.convert import hybrid_mixers
from zoo.recipe import Recipe

__all__ = [
    "MEASURES",
    "wanted_measures",
    "cached_reference",
    "read_reference",
    "write_reference",
    "measure",
    "teacher_reference",
    "teacher_measure",
    "teacher_measures",
    "long_context_of",
    "branch_ablation",
]

#: the measures a recipe can ask for (eval.mmlu, eval.passkey_lengths, eval.decode_contexts,
#: eval.generation_prompts, eval.long_context)
MEASURES = ("mmlu", "passkey", "decode", "generation", "long_context")


def _say(msg: str) -> None:
    print(f"zoo: {msg}", file=sys.stderr, flush=True)


def wanted_measures(recipe: Recipe) -> list[str]:
    e = recipe.eval
    asked = (
        e.mmlu > 0,
        bool(e.passkey_lengths),
        bool(e.decode_contexts),
        e.generation_prompts > 0,
        e.long_context > 0,
    )
    return [name for name, on in zip(MEASURES, asked) if on]


def _reference_path(kind: str, key: dict):
    from zoo.data.cache import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir("references") / f"{kind}-{digest}.json"


def read_reference(kind: str, key: dict) -> Any | None:
    """The cached result of (kind, key), or None."""
    path = _reference_path(kind, key)
    return json.loads(path.read_text())["result"] if path.exists() else None


def write_reference(kind: str, key: dict, result: Any) -> None:
    write_json(_reference_path(kind, key), {"key": key, "result": result})


def cached_reference(kind: str, key: dict, compute: Callable[[], Any]) -> Any:
    """`compute()` once per (kind, key); kept in `$ZOO_CACHE/references/<kind>-<hash>.json`."""
    result = read_reference(kind, key)
    if result is None:
        result = compute()
        write_reference(kind, key, result)
    return result


def _measure_key(name: str, recipe: Recipe, device: torch.device) -> dict:
    """What the teacher's result of measure `name` depends on."""
    d, e = recipe.to_dict(), recipe.eval
    key: dict[str, Any] = {"model": d["model"], "device": device.type}
    if name == "mmlu":
        key["questions"] = e.mmlu
    elif name == "passkey":
        key |= {
            "data": recipe.data_key(),
            "lengths": e.passkey_lengths,
            "trials": e.passkey_trials,
            "multikey": e.passkey_multikey,
            "seed": recipe.seed,
        }
    elif name == "long_context":
        from zoo.long_context import free_window_of

        key |= {
            "data": recipe.data_key(),
            "length": e.long_context,
            "blocks": e.long_context_blocks,
            "free_window": list(free_window_of(recipe.mixer.name, recipe.mixer_options())),
        }
    elif name == "generation":
        key |= {
            "data": recipe.data_key(),
            "prompts": e.generation_prompts,
            "prompt_tokens": e.generation_prompt_tokens,
            "tokens": e.generation_tokens,
        }
    return key


def measure(name: str, recipe: Recipe, data: Any, model: Any, tokenizer: Any) -> dict:
    """Measure `name` (one of MEASURES) of `model` as the recipe's eval section asks."""
    e = recipe.eval
    if name == "mmlu":
        from zoo.mmlu import evaluate_mmlu

        return evaluate_mmlu(model, tokenizer, limit=e.mmlu)
    if name == "passkey":
        from zoo.passkey import evaluate_passkey

        filler = data.passkey_filler()
        result = evaluate_passkey(
            model, tokenizer, filler, e.passkey_lengths, e.passkey_trials, seed=recipe.seed
        )
        if e.passkey_multikey:
            result["multikey"] = evaluate_passkey(
                model, tokenizer, filler, e.passkey_lengths, e.passkey_trials, recipe.seed, e.passkey_multikey
            )
        return result
    if name == "long_context":
        return long_context_of(model, tokenizer, data, e.long_context, e.long_context_blocks)
    if name == "decode":
        from zoo.decode_cost import measure_decode

        return measure_decode(model, e.decode_contexts, e.decode_steps, seed=recipe.seed)
    if name == "generation":
        from zoo.generation import evaluate_generation, generation_prompts

        prompts = generation_prompts(
            tokenizer, data.generation_documents(), e.generation_prompts, e.generation_prompt_tokens
        )
        return evaluate_generation(model, tokenizer, prompts, e.generation_tokens)
    raise ValueError(f"unknown measure {name!r}; known: {', '.join(MEASURES)}")


def long_context_of(model: Any, tokenizer: Any, data: Any, length: int, blocks: int) -> dict[str, dict]:
    """Source -> `zoo.long_context.bucket_table` of `model` on `blocks` held-out blocks of `length` tokens
    of each of the run's sources (`data.long_context_documents()`)."""
    from zoo.long_context import position_tables

    return position_tables(model, tokenizer, data.long_context_documents(), length, blocks)


def teacher_reference(name: str, recipe: Recipe, device: torch.device) -> tuple[str, dict]:
    """The reference cache's (kind, key) of the teacher's result of measure `name` (not "decode": a
    timing)."""
    return f"teacher-{name}", _measure_key(name, recipe, device)


def teacher_measure(name: str, recipe: Recipe, data: Any, teacher: Any, tokenizer: Any) -> dict:
    """`measure(name)` of the teacher; for "long_context" {"teacher": its tables, "free_window": those of the
    teacher cut to the recipe's free window (zoo.long_context.free_window_of)}."""
    if name != "long_context":
        return measure(name, recipe, data, teacher, tokenizer)
    from zoo.long_context import free_window_model, free_window_of

    window = free_window_model(teacher, *free_window_of(recipe.mixer.name, recipe.mixer_options()))
    return {
        "teacher": measure(name, recipe, data, teacher, tokenizer),
        "free_window": measure(name, recipe, data, window, tokenizer),
    }


def teacher_measures(
    recipe: Recipe, data: Any, teacher: Any, tokenizer: Any, device: torch.device, names: list[str]
) -> dict[str, dict]:
    """The teacher's result of each measure in `names`: from the reference cache or computed now (decode
    timings always now)."""
    results = {}
    for name in names:

        def compute(name=name):
            _say(f"teacher: {name}" + ("" if name == "decode" else " (computed once, then cached)"))
            return teacher_measure(name, recipe, data, teacher, tokenizer)

        results[name] = (
            compute()
            if name == "decode"
            else cached_reference(*teacher_reference(name, recipe, device), compute)
        )
    return results


def branch_ablation(recipe: Recipe, data: Any, model: Any, tokenizer: Any) -> dict | None:
    """For a hybrid: held-out quality (and passkey, if the recipe measures it) with the window branch
    alone and with the linear branch alone. None for a mixer without branches."""
    if not hybrid_mixers(model):
        return None
    results = {}
    for branch in ("window", "linear"):
        _say(f"branch ablation: {branch} branch alone")
        with only_branch(model, branch):
            results[branch] = data.evaluate(model)
            if recipe.eval.passkey_lengths:
                results[branch]["passkey"] = measure("passkey", recipe, data, model, tokenizer)
    return results
