"""Shared fixtures (helpers live in zoo_testing.py: a module named conftest is not importable twice)."""

from __future__ import annotations

import os

import pytest
import torch
from zoo_testing import FAMILIES, tiny_model, tiny_tokenizer, write_text_files

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels' tests (tests/kernels/triton) run in Triton's CPU interpreter.
    # Triton reads TRITON_INTERPRET when it is first imported, and importing zoo (transformers, torch's
    # compiler stack) imports it: so it is set here, before any test module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def one_thread_for_tiny_tensors(request):
    """Kernel and mixer tests use tiny tensors: intra-op threads only add barrier waits."""
    if request.node.path.parent.name not in ("kernels", "mixers"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A tiny Llama saved with its tokenizer, plus in-domain and out-of-domain text files."""
    root = tmp_path_factory.mktemp("world")
    train = write_text_files(root / "train", 12, 700, seed=1)
    write_text_files(root / "ood", 4, 700, seed=2)
    tokenizer = tiny_tokenizer([p.read_text() for p in train])
    model = tiny_model(
        "llama",
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
