"""The engine on the real embedded teacher (SmolLM2-135M) and the real corpus. Marked `integration`;
`make test` runs them."""

from __future__ import annotations

import copy

import pytest
import torch

import zoo
from zoo.data import load_corpus, token_blocks
from zoo.evaluate import evaluate_corpus
from zoo.transfer.loop import LoopConfig
from zoo.transfer.stage1 import layer_mse, run_stage1

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    return zoo.load_teacher("smollm2-135m")


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(["austen", "bible", "brown"])


def test_teacher_perplexity_per_corpus_is_in_the_expected_range(smollm2, corpus):
    model, tokenizer = smollm2
    results = evaluate_corpus(model, tokenizer, corpus, corpus.sources, 256, 4)
    assert set(results) == {"austen", "bible", "brown"}
    for source, r in results.items():
        # seen on this machine: SmolLM2 from its GGUF gives about 15-55 on such prose
        assert 8 < r["ppl"] < 80, f"{source}: perplexity {r['ppl']:.1f} means a loading or tokenizing bug"
        assert 0.6 < r["bpb"] < 1.6, f"{source}: {r['bpb']:.3f} bits per byte"


def test_softmax_conversion_of_smollm2_is_exact(smollm2):
    model, tokenizer = smollm2
    converted = zoo.linearize(copy.deepcopy(model), "softmax")
    ids = tokenizer(
        "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_lolcats_attention_transfer_on_smollm2_lowers_every_layer(smollm2, corpus, tmp_path):
    model, tokenizer = smollm2
    torch.manual_seed(0)
    student = zoo.linearize(copy.deepcopy(model), "lolcats", window=16)
    blocks = token_blocks(tokenizer, corpus.train("austen"), 64, max_blocks=32)
    before = layer_mse(student, blocks[:4])
    run_stage1(
        student,
        blocks,
        LoopConfig(
            name="stage1", tokens=64 * 4 * 6, batch_size=4, lr=1e-2, log_every=100, checkpoint_every=100
        ),
        tmp_path,
    )
    after = layer_mse(student, blocks[:4])
    assert len(after) == 30
    worse = {i: (before[i], after[i]) for i in before if not after[i] < before[i]}
    assert not worse, f"layers whose transfer MSE did not fall: {worse}"
    out = student.generate(**tokenizer("The sun", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 2
