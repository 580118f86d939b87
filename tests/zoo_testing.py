"""Test helpers: tiny random Llama / Mistral / Qwen2 / Qwen3 causal LMs, English-like text files and a
small tokenizer, all made offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from zoo.data.offline_text import WORDS, small_bpe_tokenizer, write_text_files  # noqa: F401

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(family: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=False,
    )
    if family in ("qwen2", "qwen3"):
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    return cls(**kwargs)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), attn_implementation="sdpa")
    model.generation_config.eos_token_id = None  # random weights: generate exactly max_new_tokens
    return model.eval()


def tiny_tokenizer(texts: list[str]):
    """A small byte-level BPE tokenizer trained offline on `texts`."""
    return small_bpe_tokenizer(texts)


#: the recipe the run tests start from (their overrides replace the model, data and budgets)
RECIPE = str(Path(__file__).resolve().parent.parent / "recipes" / "smollm2-135m" / "hedgehog.yaml")


def tiny_overrides(world, mixer="hedgehog", **extra) -> list[str]:
    """`zoo run` overrides for a run of seconds: the tiny world's model and text, 6 steps a stage."""
    values = {
        "model.name": world["model"],
        "mixer.name": mixer,
        "mixer.options": {},
        "data.train": [world["train"]],
        "data.eval_ood": [world["ood"]],
        "data.seq_len": 32,
        "stage1.tokens": 32 * 2 * 6,
        "stage1.batch_size": 2,
        "stage1.checkpoint_every": 2,
        "stage1.log_every": 1,
        "stage2.tokens": 32 * 2 * 6,
        "stage2.batch_size": 2,
        "stage2.checkpoint_every": 2,
        "stage2.log_every": 1,
        "stage2.lora.rank": 4,
        "eval.max_blocks": 4,
        "eval.generate_tokens": 5,
        "device": "cpu",
    }
    values.update(extra)
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def zoo_subprocess(args, env_extra=None, cwd=None, timeout=600):
    """`python -m zoo.cli ARGS` in a child process (its stdout and stderr captured as text)."""
    import subprocess
    import sys

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "zoo.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def _forked_main(args: list[str], env: dict, log: str) -> None:
    """The body of a forked `zoo` process: the caller's environment, stderr and stdout to `log`, then the
    CLI."""
    import sys

    os.environ.clear()
    os.environ.update(env)
    if env.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from zoo.cli import main

    code = main(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class ForkedZoo:
    """Runs `zoo` commands as child processes forked from one process that imported zoo, torch and
    transformers once (multiprocessing's forkserver, which has run no torch op, so forking is safe):
    a child starts in a fraction of a second instead of paying the imports again. `run(args, env)`
    returns (exit code, what the child printed); a SIGKILL shows as -9."""

    PRELOAD = ["zoo.cli", "zoo.run", "torch", "transformers", "peft", "zoo.transfer.stage2"]

    def __init__(self, log_dir):
        import multiprocessing

        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(self.PRELOAD)
        self.count = 0

    def start(self, args: list[str], env_extra: dict | None = None):
        self.count += 1
        log = self.log_dir / f"zoo-{self.count}.log"
        env = {**os.environ, **(env_extra or {})}
        proc = self.context.Process(target=_forked_main, args=(list(args), env, str(log)))
        proc.start()
        return proc, log

    def run(self, args: list[str], env_extra: dict | None = None, timeout: float = 600) -> tuple[int, str]:
        proc, log = self.start(args, env_extra)
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise TimeoutError(f"zoo {' '.join(args[:2])} ran past {timeout} s")
        return proc.exitcode, log.read_text()
