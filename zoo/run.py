"""`zoo run RECIPE`: teacher eval, conversion, stage 1, stage 2, evals, save. One folder per run:
recipe.yaml (resolved), metrics.jsonl, checkpoints/, model/, progress.json, summary.json.

Every phase's result is written to progress.json as soon as it is known, and each stage checkpoints
atomically, so a run killed anywhere and started again with the same command carries on from
where it was and ends with the same result.
"""

from __future__ import annotations

import sys
from pathlib import Path

from zoo.recipe import Recipe, load_recipe
from zoo.run_state import RunState, open_run
from zoo.transfer.loop import CheckpointError


def _say(msg: str) -> None:
    print(f"zoo: {msg}", file=sys.stderr, flush=True)


def run_recipe(recipe: Recipe, out_dir: str | Path, redo: tuple[str, ...] = ()) -> dict | None:
    """Run a whole recipe into `out_dir` (resuming what is there). Returns the summary dict.

    Everything cheap is checked first (zoo.preflight); then the folder is claimed (zoo.run_state: one
    writer, stage-by-stage reuse, `redo`), and a finished run returns its summary without loading anything.
    A recipe with stage1.blockwise.block_size > 0, or any recipe in a process started by torchrun,
    runs through zoo.scale.pipeline (block-wise stage 1, FSDP2 stage 2); there only rank 0 returns
    the summary and the other ranks None."""
    from zoo.preflight import check_run
    from zoo.scale.dist import launched_by_torchrun

    out = Path(out_dir)
    _, warnings = check_run(recipe, out)
    for warning in warnings:
        _say(warning)
    if recipe.stage1.blockwise.block_size or launched_by_torchrun():
        from zoo.scale.pipeline import run_scaled

        return run_scaled(recipe, out, redo)
    with open_run(recipe, out, redo) as state:
        if state.finished_summary is not None:
            _say(f"{out} is a finished run: its summary follows (--redo eval evaluates it again)")
            return state.finished_summary
        try:
            return _run_claimed(recipe, state)
        except CheckpointError as err:
            raise CheckpointError(
                f"{err}; redo that stage with: {state.redo_command(err.stage)}", err.stage
            ) from None


def _run_claimed(recipe: Recipe, state: RunState) -> dict:
    from zoo.single_run import SingleRun  # torch and transformers load here, after the checks

    return SingleRun(recipe, state).run()


def same_recipe(path: Path, recipe: Recipe) -> bool:
    """Whether the run folder's recipe.yaml is `recipe` (keys added to the schema since take their
    defaults)."""
    try:
        return load_recipe(path).to_dict() == recipe.to_dict()
    except ValueError:
        return False
