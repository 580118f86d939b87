"""Passkey retrieval: a 5-digit number hidden in filler text, asked for at the end.

The prompt follows the passkey test of Mohtashami & Jaggi 2023 (Landmark Attention), with real corpus
text as the filler instead of a repeated sentence::

    There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. ...
    <filler> The pass key is 41702. Remember it. 41702 is the pass key. <filler>
    What is the pass key? The pass key is 41702

Each prompt is exactly `length` tokens, answer included; the needle sits at depths spread evenly over
the filler (trial i of n at depth (i + 0.5) / n). A trial counts as retrieved when the model's greedy
next-token prediction is right at every token of the answer, which is what greedy decoding would
produce, scored in one teacher-forced forward (no generation loop).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from zoo.evaluate import model_device

__all__ = ["INTRO", "passkey_prompt", "filler_tokens", "evaluate_passkey"]

INTRO = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key.\n\n"
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER = " {key}"


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def filler_tokens(tokenizer: Any, texts: Sequence[Any], needed: int) -> torch.Tensor:
    """At least `needed` token ids of filler from `texts` (strings or zoo.data.Document), repeated if
    short."""
    from zoo.data.blocks import token_stream

    stream = token_stream(tokenizer, list(texts))
    if stream.numel() == 0:
        raise ValueError("passkey: the filler texts hold no tokens")
    repeats = -(-needed // stream.numel())
    return stream.repeat(repeats)[: max(needed, stream.numel())]


def passkey_prompt(
    tokenizer: Any, filler: torch.Tensor, length: int, key: int, depth: float, offset: int = 0
) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) with len(prompt) + len(answer) == `length`; the needle sits after
    `depth` (0..1) of the filler, which is read from `filler` starting at `offset` (wrapping around)."""
    intro, needle = _encode(tokenizer, INTRO), _encode(tokenizer, NEEDLE.format(key=key))
    question, answer = _encode(tokenizer, QUESTION), _encode(tokenizer, ANSWER.format(key=key))
    fixed = len(intro) + len(needle) + len(question) + len(answer)
    n_filler = length - fixed
    if n_filler < 1:
        raise ValueError(
            f"passkey: a context of {length} tokens is too short; the instructions, needle, question "
            f"and answer alone take {fixed} tokens with this tokenizer"
        )
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey: depth must be in [0, 1], got {depth}")
    index = (torch.arange(n_filler) + offset) % filler.numel()
    text = filler[index].tolist()
    cut = int(round(depth * n_filler))
    return intro + text[:cut] + needle + text[cut:] + question, answer


@torch.no_grad()
def _retrieved(model: Any, prompt: list[int], answer: list[int], device: torch.device) -> bool:
    ids = torch.tensor([prompt + answer], dtype=torch.long, device=device)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(answer) + 1).logits
    predicted = logits[0, :-1].argmax(-1).tolist()  # the predictions made at the last prompt token onwards
    return predicted == answer


def evaluate_passkey(
    model: Any,
    tokenizer: Any,
    filler_texts: Sequence[Any],
    lengths: Sequence[int],
    trials: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Passkey retrieval accuracy of a causal LM at each context length (in tokens).

    Returns ``{"lengths": {"<length>": {"accuracy", "correct", "n"}}, "mean_accuracy", "trials"}``. The
    keys, depths and filler offsets depend only on `seed`, `length` and the trial, so every model
    gets the same prompts."""
    if trials < 1:
        raise ValueError(f"passkey: trials must be >= 1, got {trials}")
    if not lengths:
        raise ValueError("passkey: give at least one context length")
    filler = filler_tokens(tokenizer, filler_texts, max(lengths))
    device = model_device(model)
    was_training = getattr(model, "training", False)
    model.eval()
    per_length: dict[str, dict[str, Any]] = {}
    try:
        for length in lengths:
            rng = random.Random(seed * 1_000_003 + int(length))
            correct = 0
            for trial in range(trials):
                key = rng.randint(10_000, 99_999)
                offset = rng.randrange(filler.numel())
                prompt, answer = passkey_prompt(
                    tokenizer, filler, int(length), key, (trial + 0.5) / trials, offset
                )
                correct += _retrieved(model, prompt, answer, device)
            per_length[str(length)] = {"accuracy": correct / trials, "correct": correct, "n": trials}
    finally:
        if was_training:
            model.train()
    mean = sum(r["accuracy"] for r in per_length.values()) / len(per_length)
    return {"lengths": per_length, "mean_accuracy": mean, "trials": trials}
