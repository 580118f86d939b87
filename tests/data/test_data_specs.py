"""Specs (embedded names, files, globs, hf:), the Corpus, load_corpus's failure handling, the caches."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

import zoo.data.fetch as fetch
import zoo.data.sources as sources
from zoo.data import (
    EMBEDDED_SOURCES,
    Corpus,
    Document,
    SourceUnavailable,
    cache_dir,
    load_corpus,
    load_documents,
    split_documents,
)
from zoo.data.hf import parse_hf_spec


@pytest.fixture
def text_tree(tmp_path):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text("Alpha text.\n", encoding="utf-8")
    (root / "b.md").write_text("# Beta\n\nSome *markdown* — naïve.", encoding="utf-8")
    (root / "sub" / "c.txt").write_text("Gamma.", encoding="utf-8")
    (root / "empty.txt").write_text("  \n", encoding="utf-8")
    (root / "data.bin").write_bytes(b"\x00\x01")
    (root / ".hidden" / "d.txt").write_text("hidden", encoding="utf-8")
    return root


def test_cache_dir_follows_zoo_cache(zoo_cache):
    assert cache_dir() == zoo_cache and zoo_cache.is_dir()
    assert cache_dir("corpus", "x") == zoo_cache / "corpus" / "x" and (zoo_cache / "corpus" / "x").is_dir()


def test_user_file_folder_and_glob(text_tree):
    one = load_documents(str(text_tree / "a.txt"))
    assert one == [Document(str(text_tree / "a.txt"), str(text_tree / "a.txt"), "Alpha text.")]
    folder = load_documents(str(text_tree))
    assert [d.doc_id for d in folder] == [
        "a.txt",
        "b.md",
        "sub/c.txt",
    ]  # text files, recursive, no hidden/empty
    assert folder[1].text == "# Beta\n\nSome *markdown* — naïve." and {d.source for d in folder} == {
        str(text_tree)
    }
    flat = load_documents(str(text_tree / "*.txt"))
    assert [d.text for d in flat] == ["Alpha text."]
    deep = load_documents(str(text_tree / "**" / "*.txt"))
    assert sorted(d.text for d in deep) == ["Alpha text.", "Gamma."]


@pytest.mark.parametrize("spec", ["no-such-source", "/no/such/file.txt"])
def test_unknown_spec(spec):
    with pytest.raises(ValueError, match="unknown data spec") as e:
        load_documents(spec)
    assert spec in str(e.value) and "austen" in str(e.value)


def test_empty_results_name_the_spec(text_tree):
    for spec in (str(text_tree / "*.nothing"), str(text_tree / "empty.txt")):
        with pytest.raises(ValueError, match="gave no documents") as e:
            load_documents(spec)
        assert spec in str(e.value)
    with pytest.raises(ValueError):
        load_documents("")


def test_embedded_names_dispatch_and_jsonl_cache(zoo_cache, monkeypatch):
    calls = []

    def fake_load():
        calls.append(1)
        return [Document("brown", "ca01", "The jury said."), Document("brown", "ca02", "Más “texto”.")]

    import zoo.data.sources.brown as brown

    monkeypatch.setattr(brown, "load", fake_load)
    first = load_documents("brown")
    assert load_documents("brown") == first and len(calls) == 1  # the second load reads the JSON lines
    assert (zoo_cache / "corpus" / "brown.v1.jsonl").is_file()
    assert first[1].text == "Más “texto”."
    assert EMBEDDED_SOURCES == ("austen", "bible", "brown")


def test_hf_spec_parsing():
    assert parse_hf_spec("hf:wikitext:wikitext-2-raw-v1@test") == ("wikitext", "wikitext-2-raw-v1", "test")
    assert parse_hf_spec("hf:org/data") == ("org/data", None, "train")
    assert parse_hf_spec("hf:org/data@validation[:100]") == ("org/data", None, "validation[:100]")
    with pytest.raises(ValueError):
        parse_hf_spec("hf:")


def test_hf_dataset_with_stub(monkeypatch):
    seen = {}

    class Table:
        column_names = ["text", "label"]

        def __getitem__(self, column):
            return ["first row", "", "  ", "second row"]

    def load_dataset(name, config, split):
        seen.update(name=name, config=config, split=split)
        return Table()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs = load_documents("hf:org/data:cfg@test")
    assert seen == {"name": "org/data", "config": "cfg", "split": "test"}
    assert [(d.source, d.doc_id, d.text) for d in docs] == [
        ("hf:org/data:cfg@test", "test/0", "first row"),
        ("hf:org/data:cfg@test", "test/3", "second row"),
    ]


def test_hf_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(SourceUnavailable, match="pip install datasets"):
        load_documents("hf:x")

    def unreachable(*a, **k):
        raise ConnectionError("hub down")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unreachable))
    with pytest.raises(SourceUnavailable, match="hub is reachable"):
        load_documents("hf:x")
    table = types.SimpleNamespace(column_names=["content"])
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: table))
    with pytest.raises(ValueError, match="no 'text' column.*content"):
        load_documents("hf:x")


def test_corpus_views_and_stats(make_char_tokenizer):
    docs = {s: [Document(s, str(i), "x" * (10 + i)) for i in range(n)] for s, n in (("a", 10), ("b", 3))}
    corpus = Corpus({s: split_documents(d, 0.2) for s, d in docs.items()})
    assert corpus.sources == ["a", "b"]
    assert len(corpus.train("a")) == 8 and len(corpus.heldout("a")) == 2 and len(corpus.heldout("b")) == 1
    assert corpus.train() == corpus.train("a") + corpus.train("b")
    assert corpus.heldout(["b", "a"]) == corpus.heldout("b") + corpus.heldout("a")
    with pytest.raises(KeyError, match="its sources are"):
        corpus.train("zzz")
    stats = corpus.stats()
    assert stats["a"]["train_documents"] == 8 and stats["b"]["heldout_documents"] == 1
    assert stats["a"]["train_characters"] + stats["a"]["heldout_characters"] == sum(10 + i for i in range(10))
    tokens = corpus.token_stats(make_char_tokenizer())
    assert tokens["a"]["train_tokens"] == stats["a"]["train_characters"]  # one token per character


def test_fetch_failure_is_reported_and_skipped(zoo_cache, text_tree, monkeypatch, capsys):
    monkeypatch.setattr(fetch.shutil, "which", lambda tool: None)  # no apt-get, dpkg-deb, npm
    with pytest.raises(SourceUnavailable, match=r"'austen'.*apt-get") as e:
        load_documents("austen")
    assert "r-cran-janeaustenr" in str(e.value)
    with pytest.raises(SourceUnavailable, match=r"'brown'.*install Node.js and npm"):
        load_documents("brown")

    corpus = load_corpus(["austen", str(text_tree), "brown"], heldout_fraction=0.34)
    assert corpus.sources == [str(text_tree)] and len(corpus.heldout()) == 1
    err = capsys.readouterr().err
    assert "skipping data source 'austen'" in err and "skipping data source 'brown'" in err
    with pytest.raises(SourceUnavailable, match="no data source could be loaded"):
        load_corpus(("austen", "brown"))
    with pytest.raises(SourceUnavailable, match="'austen'"):
        load_corpus(["austen", str(text_tree)], strict=True)


def test_apt_failure_suggests_update_and_retries_as_root(zoo_cache, monkeypatch):
    commands = []

    def run(cmd, cwd):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package sword-text-web")

    monkeypatch.setattr(fetch.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(fetch, "_run", run)
    monkeypatch.setattr(fetch.os, "geteuid", lambda: 0, raising=False)
    with pytest.raises(SourceUnavailable, match=r"(?s)'bible'.*Unable to locate.*apt-get update"):
        load_documents("bible")
    assert commands == [
        ["apt-get", "download", "sword-text-web"],
        ["apt-get", "update"],
        ["apt-get", "download", "sword-text-web"],
    ]
    assert not (zoo_cache / "raw" / "debian" / "sword-text-web").exists()  # nothing half-made left behind
    assert not list(zoo_cache.glob("corpus/*.jsonl"))


def test_sources_cache_path_is_versioned(zoo_cache):
    assert sources.cache_path("austen").name.startswith("austen.v")
