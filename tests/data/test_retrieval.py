"""Retrieval documents to mix into training: the spec, documents that parse back, no held-out text used."""

from __future__ import annotations

import re

import pytest

from zoo.data.corpus import load_corpus, load_documents, spec_problem
from zoo.data.retrieval import parse_retrieval, parse_retrieval_spec, retrieval_documents
from zoo.data.split import split_documents
from zoo.passkey import NAMES


@pytest.fixture()
def marked_files(tmp_path):
    """12 files whose every word names its file, so any word shows where it came from."""
    for i in range(12):
        (tmp_path / f"doc{i:02d}.txt").write_text(" ".join(f"w{i:02d}x{j}" for j in range(400)) + "\n")
    return str(tmp_path / "*.txt")


def test_the_spec_takes_a_source_and_three_options():
    assert parse_retrieval_spec("retrieval:austen") == ("austen", {"keys": 1, "count": 500, "words": 600})
    assert parse_retrieval_spec("retrieval:a/b.txt?keys=4&count=10") == (
        "a/b.txt",
        {"keys": 4, "count": 10, "words": 600},
    )
    for bad, message in (
        ("retrieval:", "name the source"),
        ("retrieval:austen?depth=3", "unknown option 'depth'; allowed: keys, count, words"),
        ("retrieval:austen?keys=9", "keys must be an integer from 1 to 8, got '9'"),
        ("retrieval:austen?words=ten", "words must be an integer"),
        ("retrieval:retrieval:austen", "cannot itself be a retrieval spec"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_retrieval_spec(bad)
        assert message in spec_problem(bad)
    assert spec_problem("retrieval:austen?keys=4") is None
    assert "not an embedded source" in spec_problem("retrieval:austin")


def test_documents_parse_back_and_use_only_training_text(marked_files):
    spec = f"retrieval:{marked_files}?keys=3&count=40&words=120"
    docs = retrieval_documents(spec, load_documents)
    assert len(docs) == 40 and docs == retrieval_documents(
        spec, load_documents
    )  # the spec alone decides them
    assert load_documents(spec) == docs
    train, heldout = split_documents(load_documents(marked_files), 0.1, 0)
    held_marks = {doc.text.split()[0].split("x")[0] for doc in heldout}
    asked = set()
    for doc in docs:
        parsed = parse_retrieval(doc.text)
        assert list(parsed["keys"]) == list(NAMES[:3]) and all(
            10_000 <= k <= 99_999 for k in parsed["keys"].values()
        )
        assert parsed["answer"] == parsed["keys"][parsed["asked"]]
        asked.add(parsed["asked"])
        filler = [w for w in doc.text.split() if w.startswith("w") and "x" in w]
        assert len(filler) == 120 and not {w.split("x")[0] for w in filler} & held_marks
    assert asked == set(NAMES[:3])  # every key gets asked somewhere
    with pytest.raises(ValueError, match="not a retrieval document"):
        parse_retrieval("plain text")
    with pytest.raises(ValueError, match="fewer than 5000"):
        retrieval_documents(f"retrieval:{marked_files}?words=5000", load_documents)


def test_a_corpus_mixes_them_in_as_one_more_source(marked_files):
    spec = f"retrieval:{marked_files}?count=20&words=60"
    corpus = load_corpus([marked_files, spec], strict=True)
    assert corpus.sources == [marked_files, spec]
    assert len(corpus.train(spec)) + len(corpus.heldout(spec)) == 20


def test_a_recipe_may_not_hide_keys_in_out_of_domain_text():
    from zoo_testing import RECIPE

    from zoo.preflight import check_data
    from zoo.recipe import RecipeError, load_recipe

    recipe = load_recipe(RECIPE, ['data.train=["austen", "retrieval:brown"]', 'data.eval_ood=["brown"]'])
    with pytest.raises(RecipeError, match="hide keys in the text of an out-of-domain corpus"):
        check_data(recipe)
    fine = load_recipe(
        RECIPE, ['data.train=["austen", "retrieval:austen?keys=2"]', 'data.eval_ood=["brown"]']
    )
    assert check_data(fine) == []
