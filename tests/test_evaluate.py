"""zoo.evaluate: NLL, perplexity and bits per byte on a tiny random Llama."""

import math

import pytest
import torch

from zoo.evaluate import bits_per_byte, evaluate_texts, nll, perplexity

VOCAB = 128


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        initializer_range=0.002,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def uniform_blocks(n=6, t=33, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, t), generator=g)


def test_perplexity_of_random_model_is_near_vocab_size(model):
    ppl = perplexity(model, uniform_blocks(), batch_size=4)
    assert abs(ppl - VOCAB) / VOCAB < 0.25, ppl


def test_nll_counts_predicted_tokens(model):
    blocks = uniform_blocks(n=5, t=17)
    total, count = nll(model, blocks, batch_size=2)  # 3 batches, the last one partial
    assert count == 5 * 16
    assert total > 0
    # batch size does not change the sum
    total_one, count_one = nll(model, blocks, batch_size=5)
    assert count_one == count
    assert total_one == pytest.approx(total, rel=1e-5)


def test_nll_matches_direct_cross_entropy(model):
    blocks = uniform_blocks(n=3, t=9)
    total, count = nll(model, blocks)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB).float(), blocks[:, 1:].reshape(-1), reduction="sum"
    ).item()
    assert total == pytest.approx(expected, rel=1e-5)


def test_nll_chunked_log_softmax(model, monkeypatch):
    import zoo.evaluate as ev

    blocks = uniform_blocks(n=2, t=9)
    whole = nll(model, blocks)[0]
    monkeypatch.setattr(ev, "_CHUNK_ELEMENTS", VOCAB * 3)  # 3 rows per chunk
    assert nll(model, blocks)[0] == pytest.approx(whole, rel=1e-6)


def test_nll_restores_training_mode():
    m = tiny_llama()
    m.train()
    nll(m, uniform_blocks(n=1, t=5))
    assert m.training


def test_nll_rejects_bad_shapes(model):
    with pytest.raises(ValueError):
        nll(model, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        nll(model, torch.zeros(2, 1, dtype=torch.long))


def test_bits_per_byte_formula():
    assert bits_per_byte(math.log(2) * 100, 100, 1.0) == pytest.approx(1.0)
    assert bits_per_byte(math.log(2) * 100, 50, 4.0) == pytest.approx(0.5)
    assert bits_per_byte(10.0, 5, 2.5) == pytest.approx(10.0 / 5 / math.log(2) / 2.5)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0, 1.0)


class ByteTokenizer:
    """One token per UTF-8 byte (ids < 128 for ASCII text)."""

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))

    def __call__(self, text, add_special_tokens=False, **kwargs):
        if isinstance(text, list):
            return {"input_ids": [self.encode(t) for t in text]}
        return {"input_ids": self.encode(text)}


def test_evaluate_texts_with_stub_data_layer(model, monkeypatch):
    import sys
    import types

    stub = types.ModuleType("zoo.data")
    stub.token_blocks = lambda tok, texts, block_size, max_blocks=None: uniform_blocks(n=3, t=block_size)
    stub.bytes_per_token = lambda tok, texts: 4.0
    monkeypatch.setitem(sys.modules, "zoo.data", stub)
    out = evaluate_texts(model, object(), ["unused"], block_size=17, max_blocks=3)
    total, count = nll(model, uniform_blocks(n=3, t=17))
    assert out["blocks"] == 3 and out["tokens"] == count == 3 * 16
    assert out["ppl"] == pytest.approx(math.exp(total / count), rel=1e-6)
    assert out["bpb"] == pytest.approx(bits_per_byte(total, count, 4.0), rel=1e-6)


def test_evaluate_corpus_uses_heldout_docs(model, monkeypatch):
    import zoo.evaluate as ev

    seen = []

    class FakeCorpus:
        def heldout(self, source):
            seen.append(source)
            return [f"{source} text"]

    monkeypatch.setattr(
        ev,
        "evaluate_texts",
        lambda m, tok, docs, bs, max_blocks=None, batch_size=8: {
            "docs": list(docs),
            "block_size": bs,
            "max_blocks": max_blocks,
        },
    )
    out = ev.evaluate_corpus(model, None, FakeCorpus(), ["austen", "brown"], 64, 5)
    assert seen == ["austen", "brown"]
    assert out["brown"] == {"docs": ["brown text"], "block_size": 64, "max_blocks": 5}


def test_evaluate_texts_real_data_layer(model):
    pytest.importorskip("zoo.data")
    texts = ["the quick brown fox jumps over the lazy dog. " * 8, "a stitch in time saves nine. " * 10]
    out = evaluate_texts(model, ByteTokenizer(), texts, block_size=32, max_blocks=4, batch_size=2)
    assert set(out) >= {"ppl", "bpb", "tokens", "blocks"}
    assert out["blocks"] <= 4 and out["tokens"] == out["blocks"] * 31
    # one byte per token: bpb is log2(ppl)
    assert out["bpb"] == pytest.approx(math.log2(out["ppl"]), rel=1e-6)
