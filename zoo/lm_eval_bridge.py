"""An optional bridge to lm-evaluation-harness (`lm_eval`), for machines that reach its datasets.

    pip install 'zoo-linearize[lmeval]'
    zoo eval runs/my-run --lm-eval hellaswag,arc_easy --lm-eval-limit 200

The model object itself (teacher or linearized, already loaded) goes to lm_eval's Hugging Face wrapper
(`HFLM(pretrained=model, tokenizer=...)`), so a linearized model is evaluated exactly as it runs in
zoo, with its mixers and their caches. Tasks are named as lm_eval names them; `include_path` adds a
folder of task YAML files (a task of your own, on a local dataset: `dataset_path: json` with
`dataset_kwargs: {data_files: ...}`). lm_eval is imported only when this is called.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zoo.evaluate import model_device

__all__ = ["run_lm_eval"]

INSTALL_HINT = "pip install 'zoo-linearize[lmeval]' (or pip install lm-eval)"


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise RuntimeError(f"lm-evaluation-harness is not installed ({err}); {INSTALL_HINT}") from None
    return lm_eval, HFLM, TaskManager


def _task_manager(TaskManager, tasks: list[str], include_path: str | Path | None):
    """lm_eval's task index; only `include_path` when it holds every task (indexing lm_eval's own ~15k
    task files takes seconds), else both."""
    if include_path:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=str(include_path) if include_path else None)


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    include_path: str | Path | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate `model` on lm_eval `tasks`; returns {"results": {task: {metric: value}}, "n_samples",
    "configs": {task: the task's resolved config}} as plain JSON-able values."""
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    tasks = [t for t in tasks if t]
    if not tasks:
        raise ValueError("lm_eval: name at least one task")
    manager = _task_manager(TaskManager, tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor in {include_path})" if include_path else ""
        raise ValueError(f"lm_eval: unknown task(s) {unknown}{where}; see `lm_eval ls tasks` for the names")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model_device(model)))
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    keep = {
        "results": out["results"],
        "n_samples": out.get("n-samples"),
        "configs": {t: out.get("configs", {}).get(t) for t in out["results"]},
    }
    return json.loads(json.dumps(keep, default=str))  # numpy numbers and callables become plain values
