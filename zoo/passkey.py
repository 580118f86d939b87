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

from zoo.data.retrieval import INTRO, NAMED_NEEDLE, NAMED_QUESTION, NAMES
from zoo.evaluate import model_device

__all__ = ["INTRO", "NAMES", "passkey_prompt", "multikey_prompt", "filler_tokens", "evaluate_passkey"]

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
    needle = _encode(tokenizer, NEEDLE.format(key=key))
    question, answer = _encode(tokenizer, QUESTION), _encode(tokenizer, ANSWER.format(key=key))
    return _haystack(tokenizer, filler, length, [(depth, needle)], question, answer, offset)


def multikey_prompt(
    tokenizer: Any,
    filler: torch.Tensor,
    length: int,
    keys: Sequence[int],
    asked: int,
    depth: float,
    offset: int = 0,
) -> tuple[list[int], list[int]]:
    """The multi-key variant: one needle per key, each naming its owner (`NAMES`), and the question asks
    for key `asked`. Its needle sits after `depth` of the filler; the others are spread evenly over the rest
    (needle i of the n - 1 others at (i + 0.5) / (n - 1)), so every trial holds every key."""
    if not 1 <= len(keys) <= len(NAMES):
        raise ValueError(f"passkey: 1 to {len(NAMES)} keys per prompt, got {len(keys)}")
    if not 0 <= asked < len(keys):
        raise ValueError(f"passkey: asked must index the keys (0..{len(keys) - 1}), got {asked}")
    others = [i for i in range(len(keys)) if i != asked]
    depths = {asked: depth} | {i: (j + 0.5) / len(others) for j, i in enumerate(others)}
    needles = [
        (depths[i], _encode(tokenizer, NAMED_NEEDLE.format(name=NAMES[i], key=keys[i])))
        for i in sorted(depths, key=depths.get)
    ]
    question = _encode(tokenizer, NAMED_QUESTION.format(name=NAMES[asked]))
    return _haystack(
        tokenizer,
        filler,
        length,
        needles,
        question,
        _encode(tokenizer, ANSWER.format(key=keys[asked])),
        offset,
    )


def _haystack(tokenizer, filler, length, needles, question, answer, offset):
    """INTRO, then `length` - (everything else) filler tokens from `offset` with each (depth, ids) needle cut
    in after `depth` of them, then the question; and the answer."""
    intro = _encode(tokenizer, INTRO)
    fixed = len(intro) + sum(len(ids) for _, ids in needles) + len(question) + len(answer)
    n_filler = length - fixed
    if n_filler < 1:
        raise ValueError(
            f"passkey: a context of {length} tokens is too short; the instructions, needle(s), question "
            f"and answer alone take {fixed} tokens with this tokenizer"
        )
    for depth, _ in needles:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"passkey: depth must be in [0, 1], got {depth}")
    index = (torch.arange(n_filler) + offset) % filler.numel()
    text = filler[index].tolist()
    prompt, at = list(intro), 0
    for depth, ids in sorted(needles, key=lambda needle: needle[0]):
        cut = int(round(depth * n_filler))
        prompt += text[at:cut] + ids
        at = cut
    return prompt + text[at:] + question, answer


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
    keys: int = 1,
) -> dict[str, Any]:
    """Passkey retrieval accuracy of a causal LM at each context length (in tokens); trial i of n puts the
    asked needle at depth (i + 0.5) / n, so the trials sweep the depth. `keys` > 1: the multi-key variant
    (`multikey_prompt`: that many named keys in every prompt, one asked).

    Returns ``{"lengths": {"<length>": {"accuracy", "correct", "n", "by_depth": {"<depth>": 0 or 1}}},
    "mean_accuracy", "trials", "keys"}``. The keys, depths and filler offsets depend only on `seed`,
    `length`, `keys` and the trial, so every model gets the same prompts."""
    if trials < 1:
        raise ValueError(f"passkey: trials must be >= 1, got {trials}")
    if not 1 <= keys <= len(NAMES):
        raise ValueError(f"passkey: keys must be 1 to {len(NAMES)}, got {keys}")
    if not lengths:
        raise ValueError("passkey: give at least one context length")
    filler = filler_tokens(tokenizer, filler_texts, max(lengths))
    device = model_device(model)
    was_training = getattr(model, "training", False)
    model.eval()
    per_length: dict[str, dict[str, Any]] = {}
    try:
        for length in lengths:
            rng = random.Random(seed * 1_000_003 + int(length) + (keys - 1) * 7_919)
            by_depth = {}
            for trial in range(trials):
                depth = (trial + 0.5) / trials
                drawn = [rng.randint(10_000, 99_999) for _ in range(keys)]
                offset = rng.randrange(filler.numel())
                if keys == 1:
                    prompt, answer = passkey_prompt(tokenizer, filler, int(length), drawn[0], depth, offset)
                else:
                    asked = rng.randrange(keys)
                    prompt, answer = multikey_prompt(
                        tokenizer, filler, int(length), drawn, asked, depth, offset
                    )
                by_depth[f"{depth:.3f}"] = int(_retrieved(model, prompt, answer, device))
            correct = sum(by_depth.values())
            per_length[str(length)] = {
                "accuracy": correct / trials,
                "correct": correct,
                "n": trials,
                "by_depth": by_depth,
            }
    finally:
        if was_training:
            model.train()
    mean = sum(r["accuracy"] for r in per_length.values()) / len(per_length)
    return {"lengths": per_length, "mean_accuracy": mean, "trials": trials, "keys": keys}
