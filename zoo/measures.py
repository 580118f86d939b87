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
    "teacher_measures",
    "branch_ablation",
]

#: the measures a recipe can ask for (eval.mmlu, eval.passkey_lengths, eval.decode_contexts,
#: eval.generation_prompts)
MEASURES = ("mmlu", "passkey", "decode", "generation")


def _say(msg: str) -> None:
    print(f"zoo: {msg}", file=sys.stderr, flush=True)


def wanted_measures(recipe: Recipe) -> list[str]:
    e = recipe.eval
    asked = (e.mmlu > 0, bool(e.passkey_lengths), bool(e.decode_contexts), e.generation_prompts > 0)
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
            "seed": recipe.seed,
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

        return evaluate_passkey(
            model, tokenizer, data.passkey_filler(), e.passkey_lengths, e.passkey_trials, seed=recipe.seed
        )
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


def teacher_reference(name: str, recipe: Recipe, device: torch.device) -> tuple[str, dict]:
    """The reference cache's (kind, key) of the teacher's result of measure `name` (not "decode": a
    timing)."""
    return f"teacher-{name}", _measure_key(name, recipe, device)


def teacher_measures(
    recipe: Recipe, data: Any, teacher: Any, tokenizer: Any, device: torch.device, names: list[str]
) -> dict[str, dict]:
    """The teacher's result of each measure in `names`: from the reference cache or computed now (decode
    timings always now)."""
    results = {}
    for name in names:

        def compute(name=name):
            _say(f"teacher: {name}" + ("" if name == "decode" else " (computed once, then cached)"))
            return measure(name, recipe, data, teacher, tokenizer)

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
