"""The named budgets of `zoo bench quality`, in one place: tokens per stage, sequence length and what the
evaluation measures. A budget becomes recipe overrides (`Budget.recipe_overrides`), applied to every
mixer's recipe alike, so every mixer (and the fair reference) trains and is measured the same way.

`--budget` takes a name below or a YAML file of budget fields; a file may start from a named budget
(`base: quick`) and change some fields. The budget's name is the file's stem.

Throughput behind the sizes (SmolLM2-135M, fp32, 2 CPU cores, seq_len 256): stage 1 ~280 tok/s,
stage 2 ~130 tok/s, a forward pass ~450 tok/s, greedy generation ~10 tok/s. `Budget.estimate_seconds` turns a
budget into an
estimate of the wall time per mixer on that machine (the bench's ETA before a mixer has finished).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Budget", "BUDGETS", "get_budget"]

#: tokens/s of SmolLM2-135M (fp32, 2 CPU cores, seq_len 256) for `Budget.estimate_seconds`
THROUGHPUT = {"stage1": 280.0, "stage2": 130.0, "forward": 450.0, "generate": 10.0}
#: fixed seconds per run: loading the teacher and the data, saving the model, the sample
FIXED_SECONDS = 15.0
#: tokens of one 5-shot MMLU prompt, on average, with the SmolLM2 tokenizer (measured: 500 over the first
#: 20 questions of the topic spread, 590 over 200)
MMLU_PROMPT_TOKENS = 550


@dataclass(frozen=True, kw_only=True)
class Budget:
    name: str
    description: str
    seq_len: int  # tokens per training and evaluation block
    batch_size: int  # blocks per optimizer step in stage 2 (and the fair reference)
    stage1_batch_size: int  # blocks per optimizer step in stage 1: small, because at these token budgets the
    # number of steps limits attention transfer (lolcats, 61,440 tokens: batch 1 -> stage-1 ppl 36.1, batch 4
    # -> 41.4)
    stage1_tokens: int  # attention transfer
    stage2_tokens: int  # LoRA (the fair reference gets the same)
    eval_blocks: int  # held-out blocks per corpus for perplexity / bits per byte
    mse_blocks: int  # training blocks for the per-layer transfer MSE
    mmlu: int  # 5-shot MMLU questions (0: skip)
    passkey_lengths: tuple[int, ...]  # contexts (tokens) for passkey retrieval (empty: skip)
    passkey_trials: int  # prompts per context
    decode_contexts: tuple[int, ...]  # contexts for decode tok/s and state bytes (empty: skip)
    decode_steps: int  # timed decoding steps per context
    checkpoint_every: int = 10  # optimizer steps
    log_every: int = 1  # optimizer steps: the stage-2 loss curve has a point per logged step
    generate_tokens: int = 16  # the sample in summary.json
    generation_prompts: int = 4  # held-out prompts continued greedily for the repeats measure (0: skip)
    generation_tokens: int = 48  # tokens generated per prompt
    passkey_multikey: int = 0  # named keys in the multi-key passkey variant (0: skip)
    long_context: int = 0  # block length for perplexity by position beside the free window (0: skip)
    long_context_blocks: int = 4  # held-out blocks per corpus for long_context

    def __post_init__(self):
        for f in (
            "seq_len",
            "batch_size",
            "stage1_batch_size",
            "eval_blocks",
            "mse_blocks",
            "passkey_trials",
            "decode_steps",
            "log_every",
            "long_context_blocks",
        ):
            if getattr(self, f) < 1:
                raise ValueError(f"budget {self.name!r}: {f} must be >= 1, got {getattr(self, f)}")
        for f in (
            "stage1_tokens",
            "stage2_tokens",
            "mmlu",
            "checkpoint_every",
            "generate_tokens",
            "generation_prompts",
            "passkey_multikey",
            "long_context",
        ):
            if getattr(self, f) < 0:
                raise ValueError(f"budget {self.name!r}: {f} must be >= 0, got {getattr(self, f)}")
        if self.generation_tokens < 4:
            raise ValueError(
                f"budget {self.name!r}: generation_tokens must be >= 4, got {self.generation_tokens}"
            )

    def recipe_overrides(self) -> dict[str, Any]:
        """Dotted recipe keys -> values (see zoo.recipe)."""
        stage = {"checkpoint_every": self.checkpoint_every, "log_every": self.log_every}
        return {
            "data.seq_len": self.seq_len,
            "stage1.tokens": self.stage1_tokens,
            "stage1.batch_size": self.stage1_batch_size,
            **{f"stage1.{k}": v for k, v in stage.items()},
            "stage2.tokens": self.stage2_tokens,
            "stage2.batch_size": self.batch_size,
            **{f"stage2.{k}": v for k, v in stage.items()},
            "eval.max_blocks": self.eval_blocks,
            "eval.mse_blocks": self.mse_blocks,
            "eval.mmlu": self.mmlu,
            "eval.passkey_lengths": list(self.passkey_lengths),
            "eval.passkey_trials": self.passkey_trials,
            "eval.decode_contexts": list(self.decode_contexts),
            "eval.decode_steps": self.decode_steps,
            "eval.generate_tokens": self.generate_tokens,
            "eval.teacher_lora": True,
            "eval.generation_prompts": self.generation_prompts,
            "eval.generation_tokens": self.generation_tokens,
            "eval.passkey_multikey": self.passkey_multikey,
            "eval.long_context": self.long_context,
            "eval.long_context_blocks": self.long_context_blocks,
        }

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def estimate_seconds(self, stage1: bool = True, sources: int = 3) -> float:
        """Wall time of one mixer's run on SmolLM2-135M on 2 CPU cores (see THROUGHPUT), references
        excluded."""
        forward = (
            3 * self.eval_blocks * sources * self.seq_len  # swap, after stage 1, final
            + 2 * self.mse_blocks * self.seq_len
            + self.mmlu * MMLU_PROMPT_TOKENS
            + self.passkey_trials * sum(self.passkey_lengths) * (2 if self.passkey_multikey else 1)
            + self.long_context * self.long_context_blocks * sources
            + sum(self.decode_contexts[-1:])
        )
        train = self.stage2_tokens / THROUGHPUT["stage2"]
        if stage1:
            train += self.stage1_tokens / THROUGHPUT["stage1"]
        generate = (
            self.generation_prompts * self.generation_tokens / THROUGHPUT["generate"]
        )  # the teacher's is cached
        return FIXED_SECONDS + train + forward / THROUGHPUT["forward"] + generate


BUDGETS: dict[str, Budget] = {
    b.name: b
    for b in (
        Budget(
            name="smoke",
            description="checks the whole pipeline in seconds per mixer (tiny models, CI); "
            "the numbers mean nothing",
            seq_len=32,
            batch_size=2,
            stage1_batch_size=1,
            stage1_tokens=64,
            stage2_tokens=64,
            eval_blocks=2,
            mse_blocks=2,
            mmlu=2,
            passkey_lengths=(256,),
            passkey_trials=1,
            decode_contexts=(96, 160),
            decode_steps=2,
            generate_tokens=4,
            generation_prompts=2,
            generation_tokens=8,
        ),
        Budget(
            name="quick",
            description="every mixer in about an hour on 2 CPU cores (SmolLM2-135M): "
            "a first look, not a verdict",
            seq_len=256,
            batch_size=4,
            stage1_batch_size=1,
            stage1_tokens=12_288,
            stage2_tokens=8_192,
            eval_blocks=4,
            mse_blocks=4,
            mmlu=20,
            passkey_lengths=(256, 1024, 2048),
            passkey_trials=2,
            decode_contexts=(512, 1024, 2048),
            decode_steps=8,
            generation_prompts=2,
            generation_tokens=32,
        ),
        Budget(
            name="standard",
            description="the README leaderboard: the recipes' stage-2 budget and a quarter of their "
            "stage-1 tokens (about 20 minutes per mixer on 2 CPU cores)",
            seq_len=256,
            batch_size=4,
            stage1_batch_size=1,
            stage1_tokens=61_440,
            stage2_tokens=40_960,
            eval_blocks=12,
            mse_blocks=8,
            mmlu=200,
            passkey_lengths=(512, 1024, 2048, 4096),
            passkey_trials=8,
            decode_contexts=(512, 1024, 2048),
            decode_steps=16,
        ),
        Budget(
            name="long",
            description="long context: training on 1,024-token blocks, perplexity by position to 4k beside "
            "the free window, passkey (one key and four) to 4k (about 20 minutes per mixer on 2 CPU cores)",
            seq_len=1024,
            batch_size=1,
            stage1_batch_size=1,
            stage1_tokens=61_440,
            stage2_tokens=40_960,
            eval_blocks=4,
            mse_blocks=4,
            mmlu=0,
            passkey_lengths=(1024, 2048, 4096),
            passkey_trials=4,
            passkey_multikey=4,
            decode_contexts=(512, 1024),  # the state's growth, for the state at 8k
            decode_steps=4,
            generation_prompts=2,
            generation_tokens=32,
            long_context=4096,
            long_context_blocks=4,
        ),
    )
}


def get_budget(name_or_path: str) -> Budget:
    """A named budget, or one read from a YAML file (`base: NAME` plus the fields to change)."""
    if name_or_path in BUDGETS:
        return BUDGETS[name_or_path]
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        raise ValueError(
            f"unknown budget {name_or_path!r}; named budgets: {', '.join(BUDGETS)} "
            "(or the path of a YAML file of budget fields)"
        )
    fields = yaml.safe_load(path.read_text()) or {}
    if not isinstance(fields, dict):
        raise ValueError(f"budget file {path}: expected a mapping of budget fields")
    base_name = fields.pop("base", "quick")
    if base_name not in BUDGETS:
        raise ValueError(
            f"budget file {path}: unknown base {base_name!r}; named budgets: {', '.join(BUDGETS)}"
        )
    allowed = [f.name for f in dataclasses.fields(Budget) if f.name != "name"]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ValueError(
            f"budget file {path}: unknown field(s) {unknown}; allowed: base, {', '.join(allowed)}"
        )
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    base = BUDGETS[base_name]
    for key, value in fields.items():
        expected = type(getattr(base, key))
        items_ok = not isinstance(value, tuple) or all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
        if not isinstance(value, expected) or isinstance(value, bool) or not items_ok:
            raise ValueError(
                f"budget file {path}: {key} must be "
                f"{'a list of ints' if expected is tuple else expected.__name__}"
                f", got {value!r}"
            )
    fields.setdefault(
        "description", f"{path.name}: {base_name} with {', '.join(sorted(fields)) or 'no changes'}"
    )
    return dataclasses.replace(base, name=path.stem, **fields)
