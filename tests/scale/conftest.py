"""A tiny 4-layer Llama world for the scale-out tests (helpers: scale_testing.py)."""

from __future__ import annotations

import pytest
from zoo_testing import tiny_model, tiny_tokenizer, write_text_files


@pytest.fixture(scope="session")
def deep_world(tmp_path_factory):
    """A tiny Llama of 4 layers saved with its tokenizer, and in-domain / out-of-domain text files."""
    root = tmp_path_factory.mktemp("deep-world")
    train = write_text_files(root / "train", 12, 700, seed=1)
    write_text_files(root / "ood", 4, 700, seed=2)
    tokenizer = tiny_tokenizer([p.read_text() for p in train])
    model = tiny_model(
        "llama",
        num_hidden_layers=4,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return {
        "root": root,
        "model": str(root / "model"),
        "train": str(root / "train" / "*.txt"),
        "ood": str(root / "ood" / "*.txt"),
    }
