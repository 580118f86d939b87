"""A run folder's record of what is done, kept right when the recipe changes between two starts.

`open_run(recipe, out, redo)` claims the folder (zoo.run_folder: marker and lock), removes crash
litter, compares the recipe with the one the folder was started with, and sets aside what a change
makes stale:

- a change to model, data, mixer, seed or device makes another run: refused (use another --out);
- a change to stage1 redoes stage 1 and everything after it; to stage2, stage 2 and after; to eval,
  only the measures that key feeds. Checkpoints, results and the summary that a change voids are moved
  to `superseded/<time>/` in the folder, never deleted;
- `redo` ("stage1", "stage2", "eval") does the same as a change to that section;
- a finished run (summary.json, nothing changed) is reported, not run again.

`RunState.remember(key, value)` records one result in progress.json, atomically.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from zoo.atomic import atomic_file, clean_litter, write_json
from zoo.faults import fault_point
from zoo.recipe import Recipe, RecipeError, load_recipe
from zoo.run_folder import RunLock, claim_run_folder

#: sections whose change makes a different run
RUN_SECTIONS = ("model", "data", "mixer", "seed", "device")
#: sections whose change redoes part of the run, in run order
STAGE_SECTIONS = ("stage1", "stage2", "eval")
REDO_CHOICES = STAGE_SECTIONS
#: keys that change no result (how often to log or checkpoint, how missing data is met)
NEUTRAL_KEYS = {"checkpoint_every", "log_every", "skip_unavailable"}

#: what comes after the training stages: voided by any change to them
AFTER_TRAINING = ("final", "mmlu", "passkey", "decode", "generation", "long_context", "branches")
#: progress keys and checkpoint folders a change to each stage section voids
STAGE_VOIDS = {
    "stage1": {
        "keys": ("stage1_train", "stage1", "stage1_blocks", "stage2_train", *AFTER_TRAINING),
        "paths": ("checkpoints/stage1", "checkpoints/stage2", "blocks", "stage1"),
    },
    "stage2": {
        "keys": ("stage2_train", "teacher_lora", "teacher_lora_train", *AFTER_TRAINING),
        "paths": ("checkpoints/stage2",),
    },
}
_EVALUATIONS = ("teacher", "teacher_lora", "swap", "stage1", "final", "branches")
#: eval keys -> the progress keys whose results they change (a key not listed changes only the sample)
EVAL_VOIDS = {
    "max_blocks": _EVALUATIONS,
    "batch_size": _EVALUATIONS,
    "teacher_lora": ("teacher_lora", "teacher_lora_train"),
    "mmlu": ("mmlu",),
    "passkey_lengths": ("passkey", "branches"),
    "passkey_trials": ("passkey", "branches"),
    "passkey_multikey": ("passkey", "branches"),
    "long_context": ("long_context",),
    "long_context_blocks": ("long_context",),
    "decode_contexts": ("decode",),
    "decode_steps": ("decode",),
    "generation_prompts": ("generation",),
    "generation_prompt_tokens": ("generation",),
    "generation_tokens": ("generation",),
    "generate_prompt": ("teacher_sample",),
    "generate_tokens": ("teacher_sample",),
    "mse_blocks": ("swap", "stage1"),
    "branches": ("branches",),
}
#: the top-level results a stage change sets aside
RESULT_FILES = ("summary.json",)


def _say(msg: str) -> None:
    print(f"zoo: {msg}", file=sys.stderr, flush=True)


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe dicts (neutral keys left out)."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(a, dict) and isinstance(b, dict) and key != "options":
            changed += _changed_keys(a, b, dotted)
        elif a != b and key not in NEUTRAL_KEYS:
            changed.append(dotted)
    return changed


def migrate_progress(progress: dict) -> dict:
    """progress.json as an older zoo wrote it (training stats inside the stage entries), in today's keys."""
    if isinstance(progress.get("stage1"), dict) and "train" in progress["stage1"]:
        progress["stage1_train"] = progress["stage1"].pop("train")
    if isinstance(progress.get("stage2"), dict) and set(progress["stage2"]) == {"train"}:
        progress["stage2_train"] = progress.pop("stage2")["train"]
    return progress


class RunState:
    """The claimed run folder: its progress record and lock. Use as a context manager (releases the lock)."""

    def __init__(self, out: Path, recipe: Recipe, lock: RunLock, progress: dict, summary: dict | None):
        self.out, self.recipe, self.lock = out, recipe, lock
        self.progress = progress
        #: the summary of a finished run whose recipe did not change (then nothing is to run)
        self.finished_summary = summary

    @property
    def progress_path(self) -> Path:
        return self.out / "progress.json"

    def remember(self, key: str, value):
        self.progress[key] = value
        write_json(self.progress_path, self.progress)
        fault_point(f"progress:{key}")
        return value

    def redo_command(self, stage: str) -> str:
        return f"zoo run {self.out} --redo {stage}"

    def __enter__(self) -> RunState:
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()


def _set_aside(out: Path, relative: list[str], progress: dict, why: str) -> Path | None:
    """Move the zoo-written `relative` paths of `out` into superseded/<time>/, with the old progress."""
    present = [rel for rel in relative if (out / rel).exists()]
    if not present:
        return None
    folder = out / "superseded" / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while folder.exists():
        n += 1
        folder = folder.with_name(f"{folder.name.split('+')[0]}+{n}")
    for rel in present:
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        (out / rel).rename(target)
    if (
        out / "metrics.jsonl"
    ).exists():  # a copy: each stage that starts again drops its own rows from the live log
        shutil.copy2(out / "metrics.jsonl", folder / "metrics.jsonl")
    write_json(folder / "progress.json", progress)
    (folder / "why.txt").write_text(why + "\n")
    return folder


def _voided(changed: list[str], redo: tuple[str, ...]) -> tuple[set[str], set[str]]:
    """The progress keys and folders that changed recipe keys and --redo make stale."""
    keys, paths = set(), set()
    sections = {c.split(".")[0] for c in changed} | set(redo)
    for section in ("stage1", "stage2"):
        if section in sections:
            keys |= set(STAGE_VOIDS[section]["keys"])
            paths |= set(STAGE_VOIDS[section]["paths"])
    if "eval" in redo:
        keys |= {k for ks in EVAL_VOIDS.values() for k in ks} | set(AFTER_TRAINING)
    for key in changed:
        if key.startswith("eval."):
            keys |= set(EVAL_VOIDS.get(key.split(".")[1], ()))
    return keys, paths


def open_run(recipe: Recipe, out: Path, redo: tuple[str, ...] = ()) -> RunState:
    """Claim `out` for `recipe` and bring its record up to date (see the module docstring)."""
    bad = [r for r in redo if r not in REDO_CHOICES]
    if bad:
        raise ValueError(f"--redo {bad[0]}: allowed: {', '.join(REDO_CHOICES)}")
    out = Path(out)
    lock = claim_run_folder(out)
    try:
        return _open_claimed(recipe, out, tuple(redo), lock)
    except BaseException:
        lock.release()
        raise


def _read_record(path: Path) -> dict:
    """A JSON object the run wrote (progress.json, summary.json); {} when absent, an error naming it when
    it cannot be read."""
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({err}); move it away and run again") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: not a record zoo wrote (not a JSON object); move it away and run again")
    return record


def _open_claimed(recipe: Recipe, out: Path, redo: tuple[str, ...], lock: RunLock) -> RunState:
    for path in clean_litter(out):
        _say(f"removed what a crash left: {path}")
    recipe_path, progress_path = out / "recipe.yaml", out / "progress.json"
    progress = migrate_progress(_read_record(progress_path))
    started = bool(progress) or (out / "checkpoints").exists()
    changed: list[str] = []
    if recipe_path.exists() and started:
        try:
            old = load_recipe(recipe_path).to_dict()
        except (RecipeError, OSError) as err:
            raise ValueError(
                f"{recipe_path} is not a readable recipe ({err}); this folder's run cannot be "
                "continued: use another --out"
            ) from None
        changed = _changed_keys(old, recipe.to_dict())
        different = [c for c in changed if c.split(".")[0] in RUN_SECTIONS]
        if different:
            raise ValueError(
                f"{out} holds a run of another recipe ({', '.join(different[:4])} differ); "
                "use another --out folder"
            )
    keys, paths = _voided(changed, redo)
    stale = sorted(k for k in keys if k in progress)
    if changed or redo:
        what = ", ".join(changed + [f"--redo {r}" for r in redo])
        aside = _set_aside(out, sorted(paths) + list(RESULT_FILES), dict(progress), f"changed: {what}")
        for key in stale:
            del progress[key]
        write_json(progress_path, progress)
        _say(
            f"{what}: redoing {', '.join(stale) or 'nothing done yet'}"
            + (f"; what it replaces is kept in {aside}" if aside else "")
        )
    summary = None
    if not (changed or redo) and (out / "summary.json").exists():
        summary = _read_record(out / "summary.json")
    with atomic_file(recipe_path) as f:
        f.write(recipe.to_yaml())
    return RunState(out, recipe, lock, progress, summary)
