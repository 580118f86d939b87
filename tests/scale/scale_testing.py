"""Helpers of the scale-out tests: a small block-wise recipe and a torchrun launcher (a module named
conftest is not importable twice, so they live here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "smollm2-135m" / "hedgehog.yaml")


def overrides(world, **extra) -> list[str]:
    """A small block-wise recipe: sequences of 32 tokens, 6 steps of 2 per block (the 12 sequences
    stored, in shards of 4) and in stage 2."""
    values = {
        "model.name": world["model"],
        "mixer.name": "hedgehog",
        "mixer.options": {},
        "data.train": [world["train"]],
        "data.eval_ood": [world["ood"]],
        "data.seq_len": 32,
        "stage1.tokens": 32 * 2 * 6,
        "stage1.batch_size": 2,
        "stage1.checkpoint_every": 2,
        "stage1.log_every": 1,
        "stage1.blockwise.block_size": 1,
        "stage1.blockwise.shard_sequences": 4,
        "stage2.tokens": 32 * 2 * 6,
        "stage2.batch_size": 2,
        "stage2.checkpoint_every": 2,
        "stage2.log_every": 1,
        "stage2.lora.rank": 4,
        "eval.max_blocks": 2,
        "eval.generate_tokens": 4,
        "device": "cpu",
    }
    values.update(extra)
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def torchrun_command(nproc: int) -> list[str]:
    """The venv's `torchrun` (the README's command), or the same entry point through this Python."""
    script = Path(sys.executable).parent / "torchrun"
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", "--nproc-per-node", str(nproc)]


def torchrun(nproc: int, args: list[str], out: Path, cache: Path, env_extra: dict | None = None):
    """`torchrun --standalone --nproc-per-node N -m zoo.cli run ARGS --out OUT` on the CPU."""
    env = {k: v for k, v in os.environ.items() if k != "ZOO_FAULT_KILL_AT"}
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "ZOO_CACHE": str(cache),
            "TOKENIZERS_PARALLELISM": "false",
            **(env_extra or {}),
        }
    )
    command = [*torchrun_command(nproc), "-m", "zoo.cli", "run", RECIPE, *args, "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
