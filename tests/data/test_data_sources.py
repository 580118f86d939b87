"""Parsing and cleaning of the three embedded sources, on small real excerpts (no network)."""

from __future__ import annotations

import gzip
import re
import zlib

import numpy as np
import pytest

from zoo.data.sources import austen, bible, brown

# ---------------------------------------------------------------- austen


def _serialize(obj) -> bytes:
    from rdata.conversion import convert_python_to_r_data
    from rdata.unparser import unparse_data

    return unparse_data(convert_python_to_r_data(obj), file_format="xdr", file_type="rds")


def _write_lazyload_db(folder, objects: dict, index_gzip: bool = True, kind: str = "zlib"):
    """Write an R lazy-load database the way R does: rdb entries are length + compressed serialization."""
    rdb, variables = b"", {}
    for name, value in objects.items():
        data = _serialize(value)
        if kind == "zlib":
            entry = len(data).to_bytes(4, "big") + zlib.compress(data)
        else:  # xz, as R's compress=3 writes it
            import lzma

            entry = len(data).to_bytes(4, "big") + b"Z" + lzma.compress(data)
        variables[name] = np.array([len(rdb), len(entry)], dtype=np.int32)
        rdb += entry
    index = _serialize({"variables": variables, "references": {}, "compressed": True})
    rdx = gzip.compress(index) if index_gzip else len(index).to_bytes(4, "big") + zlib.compress(index)
    (folder / "Rdata.rdx").write_bytes(rdx)
    (folder / "Rdata.rdb").write_bytes(rdb)
    return folder / "Rdata.rdx", folder / "Rdata.rdb"


@pytest.mark.parametrize("index_gzip,kind", [(True, "zlib"), (False, "zlib"), (True, "xz")])
def test_read_lazyload_db_roundtrip(tmp_path, index_gzip, kind):
    pytest.importorskip("rdata")
    novels = {
        "emma": np.array(["EMMA", "", "CHAPTER I", "", "Emma Woodhouse, _handsome_."], dtype=object),
        "persuasion": np.array(["Chapter 1", "Sir Walter Elliot,", "of Kellynch-hall."], dtype=object),
    }
    rdx, rdb = _write_lazyload_db(tmp_path, novels, index_gzip, kind)
    got = austen.read_lazyload_db(rdx, rdb)
    assert set(got) == {"emma", "persuasion"}
    assert [str(x) for x in got["emma"]] == list(novels["emma"])
    docs = austen.documents_from_novels(got)
    assert [d.doc_id for d in docs] == ["emma/01", "persuasion/01"]  # publication order, chapter ids
    assert docs[0].text == "Emma Woodhouse, handsome."
    assert docs[1].text == "Sir Walter Elliot, of Kellynch-hall."


def test_real_janeaustenr_index_parses(fixtures_dir):
    """The real Rdata.rdx of r-cran-janeaustenr (gzip-compressed index): six novels, offsets into the rdb."""
    pytest.importorskip("rdata")
    raw = (fixtures_dir / "janeaustenr_Rdata.rdx").read_bytes()
    index = austen._unserialize(gzip.decompress(raw))
    variables = {str(k): tuple(int(x) for x in v) for k, v in index["variables"].items()}
    assert set(variables) == set(austen.NOVELS)
    spans = sorted(variables.values())
    assert spans[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_austen_lines_to_chapters(fixtures_dir):
    lines = (fixtures_dir / "austen_lines_excerpt.txt").read_text(encoding="utf-8").split("\n")
    chapters = austen.chapters(lines)
    assert len(chapters) == 2
    first, second = chapters
    assert first.startswith("Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy")
    assert "Between them it was" in first and "_" not in first  # emphasis marks stripped
    assert first.count("\n\n") == 3 and "\n" not in first.replace("\n\n", "")  # 4 paragraphs, lines joined
    assert "  " not in first
    for text in chapters:  # title page, headings, notes, scene breaks, end matter: all gone
        for junk in (
            "EMMA",
            "By Jane Austen",
            "VOLUME",
            "CHAPTER",
            "[End volume",
            "Printed by",
            "University Press",
            "* *",
            "FINIS",
        ):
            assert junk not in text
    assert second.startswith("Mr. Weston was a native of Highbury")
    assert second.endswith("were fully answered in the perfect happiness of the union.")


def test_austen_paragraphs():
    assert (
        austen.paragraphs(["", "one  two", "three", "", "", "_four_ five", ""])
        == "one two three\n\nfour five"
    )


# ---------------------------------------------------------------- bible


@pytest.fixture(scope="module")
def osis_verses(fixtures_dir):
    return (fixtures_dir / "web_osis_verses.txt").read_text(encoding="utf-8").split("\n")


def test_clean_osis_strips_markup(osis_verses):
    text = bible.clean_osis(" ".join(osis_verses))
    assert "<" not in text and ">" not in text
    assert "strong:" not in text and "H0430" not in text and "lemma" not in text
    assert "Elohim" not in text and "1:1" not in text  # footnotes removed ...
    assert text.startswith(
        "In the beginning, God created the heavens and the earth. The earth was"
    )  # ... without gluing words
    assert "A Psalm by David, when he fled from Absalom his son." in text  # canonical psalm title kept
    assert "Beloved" not in text.split("Let him kiss me")[0][-40:]  # Song of Solomon speaker label dropped
    assert "Glossary" not in text and "Abaddon" not in text  # glossary appended to Revelation dropped
    assert text.endswith("Amen.")
    assert "  " not in text and not re.search(r" [,.;:!?]", text)


def test_clean_osis_small_cases():
    assert (
        bible.clean_osis('<w lemma="strong:H1">God</w><note placement="foot">x</note><w>made</w> it.')
        == "God made it."
    )
    assert bible.clean_osis('light,<note type="crossReference">Ex 1:1</note>” and') == "light,” and"
    assert bible.clean_osis('Tom &amp; Jerry <l level="1" sID="a"/>sang<l eID="a"/>.') == "Tom & Jerry sang."
    assert bible.clean_osis('<title type="x-section">Heading</title>Text') == "Text"


class _FakeBook:
    def __init__(self, osis_name, num_chapters):
        self.osis_name, self.num_chapters = osis_name, num_chapters


class _FakeBible:
    """What documents_from_module needs of a pysword bible."""

    def __init__(self, verses):
        self.verses = verses  # (osis, chapter) -> list of raw verses

    def get_structure(self):
        books = {"ot": [_FakeBook("Gen", 2), _FakeBook("Tob", 1)], "nt": [_FakeBook("John", 1)]}
        return type("S", (), {"get_books": lambda s: books})()

    def get(self, books, chapters, clean, join):
        assert clean is False
        return join.join(self.verses.get((books[0], chapters[0]), []))


def test_bible_documents_from_module():
    fake = _FakeBible(
        {
            ("Gen", 1): ["<w>In</w> the beginning.", "Then <q>light</q>."],
            ("Gen", 2): [],
            ("Tob", 1): ["Tobit."],
            ("John", 1): ["In the beginning was<note>x</note> the Word."],
        }
    )
    docs = bible.documents_from_module(fake)
    assert [(d.source, d.doc_id, d.text) for d in docs] == [
        ("bible", "Gen.1", "In the beginning. Then light."),
        ("bible", "John.1", "In the beginning was the Word."),
    ]
    assert [d.doc_id for d in bible.documents_from_module(fake, deuterocanon=True)] == [
        "Gen.1",
        "Tob.1",
        "John.1",
    ]


# ---------------------------------------------------------------- brown


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9]+", text)


@pytest.mark.parametrize(
    "tagged,expected",
    [
        ("word/nn ,/, word/nn ./.", "word, word."),
        ("a/at (/( x/nn )/) b/nn", "a (x) b"),
        ("he/pps said/vbd ``/`` no/at evidence/nn ''/'' ./.", 'he said "no evidence".'),
        ("Ivan/np Allen/np Jr./np ./.", "Ivan Allen Jr."),
        ("it/pps is/bez ;/. ;/. and/cc why/wrb ?/. ?/.", "it is; and why?"),
        ("say/vb ,/, '/' Don't/do* worry/vb '/' ./.", "say, 'Don't worry'."),
        ("costs/nns $/nn 5/cd ,/, 10/cd %/nn more/ap", "costs $5, 10% more"),
        ("1-1/2/cd inches/nns --/-- and/or/cc", "1-1/2 inches -- and/or"),
    ],
)
def test_brown_detokenize(tagged, expected):
    assert brown.clean_tagged(tagged) == expected


def test_brown_files(fixtures_dir):
    docs = brown.documents_from_folder(fixtures_dir / "brown")
    assert [d.doc_id for d in docs] == ["ca01", "ca15", "cj23"]  # README skipped
    ca01 = docs[0].text
    assert ca01.startswith(
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent "
        'primary election produced "no evidence" that any irregularities took place.\n\n'
    )
    assert "\n\nMerger proposed\n\nHowever, the jury said" in ca01  # heading line: a paragraph of its own
    assert "Ivan Allen Jr.\n\n" in ca01
    assert "said Friday" in ca01 and "\n\n\n" not in ca01
    assert "'Don't worry, Coach -- we'll get 'em all right'\"." in docs[1].text
    assert "quite definite; as a complex" in docs[2].text and ";;" not in docs[2].text
    for doc in docs:
        assert not re.search(r"/[a-z$*]+", doc.text) and "``" not in doc.text and "''" not in doc.text
        raw = (fixtures_dir / "brown" / doc.doc_id).read_text()
        raw_words = _words(" ".join(t.rpartition("/")[0] for t in raw.split()))
        assert _words(doc.text) == raw_words  # every word kept, none glued to another
