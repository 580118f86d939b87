"""Greedy continuations of held-out text, and how much they repeat themselves.

A linearized model can score a fair perplexity and still fall into loops when it writes ("the city of
the city of the city of ..."): perplexity is teacher-forced, it never feeds the model its own output.
This measure does. Each prompt (the first tokens of a held-out document) is continued greedily, and
each continuation scores the share of its 4-grams that already occurred earlier in it: 0 for text that
never repeats a 4-gram, near 1 for a loop. The teacher's score sits beside it (a small model's greedy
text loops too). It detects loops, it does not rank quality: a model that writes noise repeats little,
so read it beside perplexity.

    prompts = generation_prompts(tokenizer, documents, count=4, prompt_tokens=32)
    evaluate_generation(model, tokenizer, prompts, new_tokens=48)
    # {"repeated_4grams": 0.31, "per_prompt": [...], "prompts": 4, "new_tokens": 48, "samples": [...]}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["REPEAT_N", "evaluate_generation", "generation_prompts", "repeated_ngram_share"]

REPEAT_N = 4
#: characters of a document tokenized to find its prompt (a chapter need not be tokenized whole)
_PROMPT_CHARS = 4_000


def repeated_ngram_share(tokens: Sequence[int], n: int = REPEAT_N) -> float:
    """The share of the n-grams of `tokens` that already occurred earlier in `tokens` (0 when it has none)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams) if grams else 0.0


def generation_prompts(
    tokenizer: Any, documents: Sequence[Any], count: int, prompt_tokens: int
) -> list[list[int]]:
    """`count` prompts of `prompt_tokens` token ids: the start of each document (zoo.data Documents or
    strings) in turn; where there are fewer documents than prompts, later stretches of them too."""
    from zoo.data.document import text_of

    if count < 1 or prompt_tokens < 1:
        raise ValueError(f"need count >= 1 and prompt_tokens >= 1, got {count} and {prompt_tokens}")
    streams, long_enough = [], 0
    for doc in documents:  # tokenized lazily: one document per prompt is the usual case
        streams.append(tokenizer(text_of(doc)[:_PROMPT_CHARS], add_special_tokens=False)["input_ids"])
        long_enough += len(streams[-1]) >= prompt_tokens
        if long_enough == count:
            break
    prompts = []
    longest = max(map(len, streams), default=0)
    for offset in range(0, longest, 2 * prompt_tokens):  # a gap between two prompts of one document
        for ids in streams:
            if len(ids) >= offset + prompt_tokens:
                prompts.append(list(ids[offset : offset + prompt_tokens]))
                if len(prompts) == count:
                    return prompts
    raise ValueError(
        f"generation: the held-out text holds only {len(prompts)} prompts of {prompt_tokens} tokens; "
        f"{count} wanted (lower eval.generation_prompts or eval.generation_prompt_tokens)"
    )


@torch.no_grad()
def evaluate_generation(
    model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], new_tokens: int, samples: int = 2
) -> dict[str, Any]:
    """Continue each prompt greedily for `new_tokens` tokens (fewer where the model ends the text);
    the mean and per-prompt share of repeated 4-grams, and the first `samples` continuations as text."""
    from zoo.evaluate import model_device

    if not prompts or new_tokens < REPEAT_N:
        raise ValueError(
            f"generation: need prompts and new_tokens >= {REPEAT_N}, got {len(prompts)} prompts and "
            f"{new_tokens} tokens"
        )
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    shares, texts = [], []
    for ids in prompts:
        x = torch.tensor([list(ids)], dtype=torch.long, device=device)
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
        )
        continuation = out[0, x.shape[1] :].tolist()
        shares.append(repeated_ngram_share(continuation))
        texts.append(tokenizer.decode(continuation, skip_special_tokens=True))
    return {
        "repeated_4grams": sum(shares) / len(shares),
        "per_prompt": shares,
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "samples": texts[:samples],
    }


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 32,
    device="cpu",
    do_sample: bool = False,
    temperature: float = 1.0,
) -> str:
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
