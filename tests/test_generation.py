"""Repeats in greedy generation: the n-gram count, the prompts taken from held-out text, and the measure
on a model that loops and on a real (tiny) one."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo_testing import tiny_model, tiny_tokenizer, write_text_files

from zoo.data.document import Document
from zoo.generation import evaluate_generation, generation_prompts, repeated_ngram_share


def test_repeated_ngram_share():
    assert repeated_ngram_share(list(range(20))) == 0.0  # nothing repeats
    loop = [1, 2, 3] * 6  # 18 tokens, 15 4-grams; the first 3 are new, the other 12 repeat them
    assert repeated_ngram_share(loop) == pytest.approx(12 / 15)
    assert repeated_ngram_share([5] * 10) == pytest.approx(6 / 7)
    assert repeated_ngram_share([1, 2, 3]) == 0.0  # shorter than one 4-gram
    assert repeated_ngram_share([1, 2, 1, 2, 1], n=2) == pytest.approx(2 / 4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    texts = [p.read_text() for p in write_text_files(tmp_path_factory.mktemp("gen"), 3, 300, seed=4)]
    return tiny_tokenizer(texts), texts


def test_prompts_are_the_starts_of_documents_then_later_stretches(world):
    tokenizer, texts = world
    docs = [Document("x", str(i), t) for i, t in enumerate(texts)]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    prompts = generation_prompts(tokenizer, docs, count=3, prompt_tokens=16)
    assert prompts == [i[:16] for i in ids]  # one per document, each its start
    more = generation_prompts(tokenizer, texts, count=5, prompt_tokens=16)  # strings work too
    assert more[:3] == prompts and more[3:] == [ids[0][32:48], ids[1][32:48]]  # then 16 tokens on, past a gap
    with pytest.raises(ValueError, match="holds only .* prompts of 16 tokens; 1000 wanted"):
        generation_prompts(tokenizer, texts, count=1000, prompt_tokens=16)
    with pytest.raises(ValueError, match="count >= 1"):
        generation_prompts(tokenizer, texts, count=0, prompt_tokens=16)


class Looper(nn.Module):
    """A stand-in LM that always predicts (last token + 1) mod `period` + 100: greedy text loops with that
    period."""

    def __init__(self, period: int):
        super().__init__()
        self.period = period
        self.dummy = nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        out = input_ids
        for _ in range(max_new_tokens):
            nxt = (out[:, -1:] + 1) % self.period + 100
            out = torch.cat([out, nxt], dim=1)
        return out


def test_a_model_that_loops_scores_near_one_and_one_that_does_not_near_zero(world):
    tokenizer, texts = world
    prompts = generation_prompts(tokenizer, texts, count=2, prompt_tokens=8)
    looping = evaluate_generation(Looper(period=3), tokenizer, prompts, new_tokens=40)
    assert looping["prompts"] == 2 and looping["new_tokens"] == 40 and len(looping["per_prompt"]) == 2
    assert looping["repeated_4grams"] == pytest.approx((40 - 3 - 3) / (40 - 3))  # all but the first 3 4-grams
    assert len(looping["samples"]) == 2 and all(isinstance(s, str) for s in looping["samples"])
    long_period = evaluate_generation(Looper(period=1000), tokenizer, prompts, new_tokens=40)
    assert long_period["repeated_4grams"] == 0.0
    with pytest.raises(ValueError, match="new_tokens >= 4"):
        evaluate_generation(Looper(3), tokenizer, prompts, new_tokens=3)


def test_a_real_model_is_measured_greedily(world):
    tokenizer, texts = world
    model = tiny_model(
        "llama",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    ).eval()
    prompts = generation_prompts(tokenizer, texts, count=3, prompt_tokens=12)
    first = evaluate_generation(model, tokenizer, prompts, new_tokens=16, samples=1)
    again = evaluate_generation(model, tokenizer, prompts, new_tokens=16, samples=1)
    assert first == again  # greedy: deterministic
    assert first["prompts"] == 3 and len(first["samples"]) == 1 and 0.0 <= first["repeated_4grams"] <= 1.0
