"""Passkey retrieval: exact prompt lengths, the needle where asked, and scoring aligned with greedy
decoding."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo_testing import tiny_model, tiny_tokenizer, write_text_files

from zoo.passkey import INTRO, NAMES, evaluate_passkey, filler_tokens, multikey_prompt, passkey_prompt


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    texts = [p.read_text() for p in write_text_files(tmp_path_factory.mktemp("pk"), 3, 400, seed=3)]
    return tiny_tokenizer(texts), texts


class Predictor(nn.Module):
    """A stand-in LM whose greedy prediction at position t is input_ids[t + shift] (shift 1: a perfect
    oracle that peeks at the next token; shift 0: repeats the current token, off by one)."""

    def __init__(self, vocab: int, shift: int):
        super().__init__()
        self.vocab, self.shift = vocab, shift
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        target = torch.roll(input_ids, -self.shift, dims=1)
        logits = torch.nn.functional.one_hot(target, self.vocab).float()
        return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})


def test_prompts_have_the_exact_length_and_the_needle_at_its_depth(world):
    tokenizer, texts = world
    filler = filler_tokens(tokenizer, texts, 800)
    for depth in (0.0, 0.5, 1.0):
        prompt, answer = passkey_prompt(tokenizer, filler, 600, 41702, depth, offset=7)
        assert len(prompt) + len(answer) == 600
        assert tokenizer.decode(answer).strip() == "41702"
        text = tokenizer.decode(prompt)
        assert text.startswith(INTRO[:40]) and text.endswith("What is the pass key? The pass key is")
        where = text.index("The pass key is 41702") / len(text)
        assert abs(where - depth) < 0.2, (depth, where)
    with pytest.raises(ValueError, match="too short"):
        passkey_prompt(tokenizer, filler, 20, 41702, 0.5)


def test_filler_wraps_around_short_texts(world):
    tokenizer, _ = world
    filler = filler_tokens(tokenizer, ["One short line."], 500)
    assert filler.numel() >= 500
    prompt, answer = passkey_prompt(tokenizer, filler, 500, 12345, 0.3)
    assert len(prompt) + len(answer) == 500


def test_scoring_is_greedy_decoding_of_the_whole_answer(world):
    tokenizer, texts = world
    vocab = len(tokenizer)
    perfect = evaluate_passkey(Predictor(vocab, shift=1), tokenizer, texts, [300, 500], trials=3)
    assert perfect["mean_accuracy"] == 1.0 and perfect["lengths"]["500"] == {
        "accuracy": 1.0,
        "correct": 3,
        "n": 3,
        "by_depth": {"0.167": 1, "0.500": 1, "0.833": 1},
    }
    off_by_one = evaluate_passkey(Predictor(vocab, shift=0), tokenizer, texts, [300, 500], trials=3)
    assert off_by_one["mean_accuracy"] == 0.0


def test_a_real_model_is_scored_the_same_way_every_time(world):
    tokenizer, texts = world
    model = tiny_model(
        "llama",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    a = evaluate_passkey(model, tokenizer, texts, [256], trials=2, seed=1)
    b = evaluate_passkey(model, tokenizer, texts, [256], trials=2, seed=1)
    assert a == b and 0.0 <= a["mean_accuracy"] <= 1.0 and a["trials"] == 2


def test_multikey_prompts_hold_every_named_key_and_ask_one(world):
    tokenizer, texts = world
    filler = filler_tokens(tokenizer, texts, 900)
    keys = [11111, 22222, 33333, 44444]
    for asked, depth in ((0, 0.1), (2, 0.9), (3, 0.5)):
        prompt, answer = multikey_prompt(tokenizer, filler, 700, keys, asked, depth, offset=5)
        assert len(prompt) + len(answer) == 700
        text = tokenizer.decode(prompt)
        # parse the haystack back: every key with its owner, the asked one where asked, the question naming it
        found = [text.index(f"The pass key of {NAMES[i]} is {key}.") for i, key in enumerate(keys)]
        assert abs(found[asked] / len(text) - depth) < 0.2, (asked, depth, found)
        assert text.endswith(f"What is the pass key of {NAMES[asked]}? The pass key of {NAMES[asked]} is")
        assert tokenizer.decode(answer).strip() == str(keys[asked])
    with pytest.raises(ValueError, match="asked"):
        multikey_prompt(tokenizer, filler, 700, keys, 4, 0.5)
    with pytest.raises(ValueError, match="keys per prompt"):
        multikey_prompt(tokenizer, filler, 700, list(range(10_000, 10_009)), 0, 0.5)


def test_multikey_scoring_and_its_prompts_differ_from_the_single_key_ones(world):
    tokenizer, texts = world
    vocab = len(tokenizer)
    perfect = evaluate_passkey(Predictor(vocab, shift=1), tokenizer, texts, [400], trials=2, keys=3)
    assert perfect["keys"] == 3 and perfect["mean_accuracy"] == 1.0
    assert perfect["lengths"]["400"]["by_depth"] == {"0.250": 1, "0.750": 1}
    assert (
        evaluate_passkey(Predictor(vocab, shift=0), tokenizer, texts, [400], trials=2, keys=3)[
            "mean_accuracy"
        ]
        == 0
    )
    with pytest.raises(ValueError, match="keys must be 1 to 8"):
        evaluate_passkey(Predictor(vocab, shift=1), tokenizer, texts, [400], keys=9)
