"""split_documents, token_blocks, bytes_per_token and the token cache."""

from __future__ import annotations

import random

import pytest
import torch

import zoo.data.blocks as blocks
from zoo.data import Document, bytes_per_token, split_documents, token_blocks


def _docs(source: str, n: int) -> list[Document]:
    return [Document(source, f"{source}-{i}", f"text {i} of {source}") for i in range(n)]


# ---------------------------------------------------------------- split


def test_split_is_disjoint_complete_and_by_document():
    docs = _docs("a", 50) + _docs("b", 7) + _docs("c", 2) + _docs("d", 1)
    train, held = split_documents(docs, 0.1, seed=0)
    key = lambda d: (d.source, d.doc_id)  # noqa: E731
    assert not set(map(key, train)) & set(map(key, held))
    assert sorted(map(key, train + held)) == sorted(map(key, docs))
    count = lambda ds, s: sum(d.source == s for d in ds)  # noqa: E731
    assert count(held, "a") == 5 and count(held, "b") == 1 and count(held, "c") == 1 and count(held, "d") == 0
    assert count(train, "c") == 1 and count(train, "d") == 1
    assert train == [d for d in docs if d in train] and held == [
        d for d in docs if d in held
    ]  # input order kept


def test_split_is_deterministic_and_order_free():
    docs = _docs("a", 40) + _docs("b", 30)
    first = split_documents(docs, 0.2, seed=3)
    assert split_documents(docs, 0.2, seed=3) == first
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    assert {d.doc_id for d in split_documents(shuffled, 0.2, seed=3)[1]} == {d.doc_id for d in first[1]}
    assert {d.doc_id for d in split_documents(docs, 0.2, seed=4)[1]} != {d.doc_id for d in first[1]}
    # a document's fate does not depend on its text: only on source, doc_id and seed
    edited = [Document(d.source, d.doc_id, d.text + " edited") for d in docs]
    assert {d.doc_id for d in split_documents(edited, 0.2, seed=3)[1]} == {d.doc_id for d in first[1]}


def test_split_edge_cases():
    docs = _docs("a", 10)
    assert split_documents(docs, 0.0) == (docs, [])
    assert split_documents([], 0.1) == ([], [])
    train, held = split_documents(docs, 0.95)
    assert len(train) == 1 and len(held) == 9
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError):
            split_documents(docs, bad)


# ---------------------------------------------------------------- blocks


def test_token_blocks_shapes_and_eos_joins(char_tokenizer):
    blocks_ = token_blocks(char_tokenizer, ["abcd", "efg", "hijklm"], block_size=4)
    stream = (
        [ord(c) + 3 for c in "abcd"]
        + [2]
        + [ord(c) + 3 for c in "efg"]
        + [2]
        + [ord(c) + 3 for c in "hijklm"]
    )
    assert blocks_.dtype == torch.long and blocks_.shape == (3, 4)  # 15 tokens -> 3 blocks, 3 dropped
    assert blocks_.flatten().tolist() == stream[:12]
    assert (
        token_blocks(char_tokenizer, ["abcd", "efg", "hijklm"], 4, max_blocks=2).tolist()
        == blocks_[:2].tolist()
    )
    assert token_blocks(char_tokenizer, ["abcd", "efg", "hijklm"], 4, max_blocks=10).shape == (3, 4)
    docs = [Document("s", "1", "abcd"), Document("s", "2", "efg"), Document("s", "3", "hijklm")]
    assert torch.equal(token_blocks(char_tokenizer, docs, 4), blocks_)
    assert token_blocks(char_tokenizer, "abcdefgh", 8).tolist() == [[ord(c) + 3 for c in "abcdefgh"]]
    assert token_blocks(char_tokenizer, ["ab", "", "cd"], 5).tolist() == [
        [100, 101, 2, 102, 103]
    ]  # empty doc skipped


def test_token_blocks_without_eos(make_char_tokenizer):
    tok = make_char_tokenizer(eos_token_id=None)
    assert token_blocks(tok, ["ab", "cd"], 4).tolist() == [[100, 101, 102, 103]]


def test_token_blocks_too_short(char_tokenizer):
    with pytest.raises(ValueError, match=r"hold 7 tokens.*16 needed"):
        token_blocks(char_tokenizer, ["abc", "def"], 16)
    with pytest.raises(ValueError, match=r"hold 0 tokens"):
        token_blocks(char_tokenizer, [], 16)
    with pytest.raises(ValueError):
        token_blocks(char_tokenizer, ["abc"], 0)
    with pytest.raises(ValueError):
        token_blocks(char_tokenizer, ["abcdef"], 2, max_blocks=0)


def test_bytes_per_token(char_tokenizer):
    assert bytes_per_token(char_tokenizer, ["abcd", "ef"]) == 1.0
    assert bytes_per_token(char_tokenizer, [Document("s", "1", "naïve — ok")]) == pytest.approx(
        13 / 10
    )  # ï: 2 bytes, —: 3 bytes
    with pytest.raises(ValueError):
        bytes_per_token(char_tokenizer, [""])


def test_token_cache_on_disk(zoo_cache, make_char_tokenizer, monkeypatch):
    monkeypatch.setattr(blocks, "MIN_CACHED_CHARS", 10)
    texts = ["first document here", "and a second one"]
    tok = make_char_tokenizer(name_or_path="char-tok")
    first = token_blocks(tok, texts, 8)
    files = list((zoo_cache / "tokens").glob("*.safetensors"))
    assert len(files) == 1
    calls = tok.calls
    again = token_blocks(tok, texts, 5)  # another block size reuses the cached token ids
    assert tok.calls == calls and again.shape == (7, 5)  # 35 tokens (EOS included)
    assert torch.equal(again.flatten()[:32], first.flatten())
    fresh = make_char_tokenizer(name_or_path="char-tok")  # the same tokenizer, loaded again: a cache hit
    assert torch.equal(token_blocks(fresh, texts, 8), first)
    other = make_char_tokenizer(name_or_path="char-tok", shift=4)  # same name, other behaviour: another key
    assert not torch.equal(token_blocks(other, texts, 8), first)
    assert len(list((zoo_cache / "tokens").glob("*.safetensors"))) == 2
    anonymous = make_char_tokenizer()  # no name or vocabulary: never cached
    token_blocks(anonymous, ["x" * 50], 8)
    assert len(list((zoo_cache / "tokens").glob("*.safetensors"))) == 2


def test_smollm2_blocks(smollm2_tokenizer):
    tok = smollm2_tokenizer
    texts = [
        "It is a truth universally acknowledged.",
        "In the beginning, God created the heavens and the earth.",
    ]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    stream = ids[0] + [tok.eos_token_id] + ids[1]
    out = token_blocks(tok, texts, 8)
    assert out.shape == (len(stream) // 8, 8) and out.flatten().tolist() == stream[: out.numel()]
    bpt = bytes_per_token(tok, texts)
    assert bpt == pytest.approx(sum(len(t.encode()) for t in texts) / (len(ids[0]) + len(ids[1])))
    assert 3.0 < bpt < 6.0
