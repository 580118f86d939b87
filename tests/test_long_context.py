"""Long-context measures: position buckets against a hand computation, blocks from document starts, the free
window equal to a masked softmax, and the share of the gap a model closes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from zoo_testing import tiny_model, tiny_tokenizer, write_text_files

import zoo
from zoo.evaluate import nll
from zoo.long_context import (
    bucket_table,
    buckets,
    document_blocks,
    free_window_model,
    free_window_of,
    gap_closed,
    long_context_table,
    position_nll,
    window_of,
)
from zoo.mixers.base import repeat_kv


def test_buckets_follow_the_edges_and_clip_the_last_one():
    assert buckets(2048) == [(0, 256), (256, 1024), (1024, 2048)]
    assert buckets(3000) == [(0, 256), (256, 1024), (1024, 2048), (2048, 3000)]
    assert buckets(100) == [(0, 100)]
    assert buckets(10_000)[-2:] == [(4096, 8192), (8192, 10_000)]
    assert buckets(700, edges=(0, 300)) == [(0, 300), (300, 700)]
    with pytest.raises(ValueError, match="at least 2 tokens"):
        buckets(1)


def test_position_nll_and_its_buckets_match_a_hand_computation():
    torch.manual_seed(0)
    model = tiny_model("llama").eval()
    blocks = torch.randint(3, 128, (3, 600))  # > 512 positions: the vocabulary projection runs in two pieces
    sums = position_nll(model, blocks)
    with torch.no_grad():
        logits = model(blocks).logits.float()
    per_token = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1), reduction="none"
    )
    per_token = per_token.view(3, 599).double()
    assert sums[0] == 0
    torch.testing.assert_close(sums[1:], per_token.sum(0), rtol=1e-5, atol=1e-5)
    table = bucket_table(sums, 3, edges=(0, 100, 450))
    assert list(table) == ["0-100", "100-450", "450-600"]
    by_hand = {"0-100": per_token[:, :99], "100-450": per_token[:, 99:449], "450-600": per_token[:, 449:]}
    for name, cells in by_hand.items():
        assert table[name]["tokens"] == cells.numel()
        assert table[name]["nll"] == pytest.approx(cells.mean().item(), rel=1e-6)
        assert table[name]["ppl"] == pytest.approx(math.exp(cells.mean().item()), rel=1e-6)
    total, count = nll(model, blocks)  # the same tokens as the plain evaluation
    assert sum(c["nll"] * c["tokens"] for c in table.values()) == pytest.approx(total, rel=1e-5)
    assert sum(c["tokens"] for c in table.values()) == count


@pytest.fixture(scope="module")
def tokenizer_and_docs(tmp_path_factory):
    texts = [p.read_text() for p in write_text_files(tmp_path_factory.mktemp("lc"), 6, 150, seed=5)]
    return tiny_tokenizer(texts), texts


def test_blocks_start_at_documents_and_join_short_ones(tokenizer_and_docs):
    tokenizer, texts = tokenizer_and_docs
    encoded = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    eos = tokenizer.eos_token_id
    length = len(encoded[0]) + 10  # the first document is too short alone: the second one completes it
    blocks = document_blocks(tokenizer, texts, length)
    assert blocks[0].tolist() == (encoded[0] + [eos] + encoded[1])[:length]
    stream_starts = []
    at = 0
    for e in encoded:
        stream_starts.append(at)
        at += len(e) + 1
    stream = [t for e in encoded for t in e + [eos]][:-1]
    # every block is the stream read from some document start; blocks never overlap
    starts = [next(s for s in stream_starts if stream[s : s + length] == row.tolist()) for row in blocks]
    assert starts == sorted(starts) and all(b - a >= length for a, b in zip(starts, starts[1:]))
    assert document_blocks(tokenizer, texts, length, max_blocks=1).shape == (1, length)
    with pytest.raises(ValueError, match="not one block"):
        document_blocks(tokenizer, texts, len(stream) + 1)


def test_the_free_window_is_the_teachers_softmax_under_a_window_and_sinks_mask():
    torch.manual_seed(0)
    B, H, Hkv, T, D = 2, 4, 2, 41, 8
    mixer = zoo.get_mixer("sliding-window")(H, Hkv, D, 32, 0, window=5, sinks=2)
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    y, _ = mixer(q, k, v, None)
    i = torch.arange(T)
    allowed = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] < 5) | (i[None, :] < 2))
    scores = (q @ repeat_kv(k, H).transpose(-1, -2)) * D**-0.5
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ repeat_kv(v, H)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no key is left"):
        zoo.get_mixer("sliding-window")(H, Hkv, D, 32, 0, window=0, sinks=0)


def test_the_free_window_model_is_the_teacher_within_its_window_and_leaves_the_teacher_alone():
    teacher = tiny_model("llama").eval()
    ids = torch.randint(3, 128, (2, 30))
    with torch.no_grad():
        expected = teacher(ids).logits
        inside = free_window_model(teacher, window=30, sinks=0)(ids).logits
        cut = free_window_model(teacher, window=4, sinks=1)(ids).logits
        after = teacher(ids).logits
    torch.testing.assert_close(inside, expected, atol=1e-5, rtol=1e-5)
    assert (cut[:, :4] - expected[:, :4]).abs().max() < 1e-5  # the first 4 queries see all they would
    assert (cut[:, 10:] - expected[:, 10:]).abs().max() > 1e-3  # later ones do not
    torch.testing.assert_close(after, expected, atol=0, rtol=0)
    assert window_of(free_window_model(teacher, window=7, sinks=3)) == (7, 4)  # at least 4 sinks
    assert window_of(free_window_model(teacher, window=7, sinks=6)) == (7, 6)
    assert window_of(teacher) == (64, 4)


def test_the_free_window_of_a_mixer_is_its_own_window_else_the_default():
    assert free_window_of("lolcats-sink") == (64, 4)
    assert free_window_of("lolcats", {"window": 32}) == (32, 4)  # sinks are free: the baseline has 4
    assert free_window_of("sliding-window", {"window": 16, "sinks": 8}) == (16, 8)
    assert free_window_of("gla") == (64, 4)
    assert free_window_of("hedgehog-sink") == (64, 4)  # window 0: no window of its own


def test_gap_closed_is_the_share_of_the_free_windows_gap_in_log_perplexity():
    assert gap_closed(2.25, 3.0, 2.0) == pytest.approx(0.75)
    assert gap_closed(2.0, 3.0, 2.0) == pytest.approx(1.0)
    assert gap_closed(3.5, 3.0, 2.0) == pytest.approx(-0.5)  # worse than not training at all
    assert gap_closed(2.5, 2.005, 2.0) is None  # no gap to close
    cell = {"1024-2048": {"nll": 2.25}}
    table = long_context_table(
        {
            "teacher": {"austen": {"1024-2048": {"nll": 2.0}}},
            "free_window": {"austen": {"1024-2048": {"nll": 3.0}}},
            "final": {"austen": cell},
        },
        (64, 4),
    )
    assert table["gap_closed"] == {"final": {"austen": {"1024-2048": pytest.approx(0.75)}}}
    assert table["free_window"] == [64, 4]
