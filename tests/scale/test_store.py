"""zoo.scale.store: the teacher's hidden states entering each block, on disk, resumable."""

from __future__ import annotations

import os

import pytest
import torch
from zoo_testing import tiny_model

from zoo.scale.skeleton import CheckpointReader
from zoo.scale.store import HiddenStateStore, StoreLayout, build_store, shard_path, tokens_fingerprint


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher") / "model"
    model = tiny_model("llama", num_hidden_layers=4)
    model.save_pretrained(folder)
    ids = torch.randint(3, 128, (10, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states  # states[l] enters layer l
    return {"folder": folder, "ids": ids, "states": states}


def layout_for(teacher, layers=(0, 2), shard_sequences=4, **changes) -> StoreLayout:
    values = dict(
        model=str(teacher["folder"]),
        num_layers=4,
        layers=list(layers),
        sequences=10,
        seq_len=16,
        hidden_size=64,
        dtype="float32",
        shard_sequences=shard_sequences,
        tokens_sha256=tokens_fingerprint(teacher["ids"]),
    )
    return StoreLayout(**(values | changes))


def build(teacher, root, rank=0, world=1, **layout) -> tuple[HiddenStateStore, int]:
    store = HiddenStateStore.open(root, layout_for(teacher, **layout), create=True)
    written = build_store(
        store,
        CheckpointReader(teacher["folder"]),
        teacher["ids"],
        torch.float32,
        torch.device("cpu"),
        batch_size=3,
        rank=rank,
        world=world,
    )
    return store, written


def test_store_holds_the_states_entering_each_block(teacher, tmp_path):
    store, written = build(teacher, tmp_path / "store")
    assert written == 2 * 3  # 2 stored layers x 3 shards (4 + 4 + 2 sequences)
    for layer in (0, 2):
        got = store.read_rows(layer, torch.arange(10))
        torch.testing.assert_close(got, teacher["states"][layer], atol=1e-5, rtol=1e-5)
    rows = torch.tensor([9, 0, 5, 5])  # any order, across shards, repeats allowed
    torch.testing.assert_close(store.inputs(2)[rows], teacher["states"][2][rows], atol=1e-5, rtol=1e-5)
    assert store.inputs(2).shape == (10, 16)
    assert (tmp_path / "store" / "index.json").is_file()
    assert shard_path(tmp_path / "store", 2, 2).is_file()


def test_written_shards_are_kept_and_torn_ones_rewritten(teacher, tmp_path):
    store, _ = build(teacher, tmp_path / "store")
    files = sorted((tmp_path / "store").glob("layer-*/shard-*.safetensors"))
    before = {f: f.stat().st_mtime_ns for f in files}
    original = store.read_rows(2, torch.arange(10))
    assert build(teacher, tmp_path / "store")[1] == 0  # complete: nothing written again
    torn = shard_path(tmp_path / "store", 2, 1)
    os.truncate(torn, torn.stat().st_size - 7)  # a copy cut short
    assert store.missing(2, range(3)) == [1]
    assert build(teacher, tmp_path / "store")[1] == 1
    for f in files:
        assert (f.stat().st_mtime_ns == before[f]) == (f != torn), f
    torch.testing.assert_close(store.read_rows(2, torch.arange(10)), original, atol=0, rtol=0)


def test_ranks_write_disjoint_shards_that_make_the_whole_store(teacher, tmp_path):
    whole, _ = build(teacher, tmp_path / "one")
    _, first = build(teacher, tmp_path / "two", rank=0, world=2)
    _, second = build(teacher, tmp_path / "two", rank=1, world=2)
    assert (first, second) == (4, 2)  # shards 0, 2 and shard 1 of each stored layer
    split = HiddenStateStore.open(tmp_path / "two", layout_for(teacher), create=False)
    for layer in (0, 2):
        torch.testing.assert_close(
            split.read_rows(layer, torch.arange(10)), whole.read_rows(layer, torch.arange(10)), atol=0, rtol=0
        )


def test_a_store_of_another_run_is_refused(teacher, tmp_path):
    build(teacher, tmp_path / "store")
    with pytest.raises(ValueError, match="built for another run.*layers"):
        HiddenStateStore.open(tmp_path / "store", layout_for(teacher, layers=(0, 1)), create=True)
    with pytest.raises(FileNotFoundError, match="no hidden-state store"):
        HiddenStateStore.open(tmp_path / "nowhere", layout_for(teacher), create=False)


def test_store_size_is_bytes_times_stored_layers_times_tokens_times_hidden():
    layout = StoreLayout(
        model="m",
        num_layers=126,
        layers=list(range(0, 126, 9)),
        sequences=50_000,
        seq_len=1000,
        hidden_size=16384,
        dtype="bfloat16",
        shard_sequences=64,
        tokens_sha256="",
    )
    assert layout.nbytes() == 2 * 14 * 50_000_000 * 16384


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_every_family_streams_block_by_block(family, tmp_path):
    """Only a block's layers in memory, the family's own forward (masks, RoPE, q/k norms) around them."""
    folder = tmp_path / "model"
    model = tiny_model(family, num_hidden_layers=4)
    model.save_pretrained(folder)
    ids = torch.randint(3, 128, (5, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
    layout = StoreLayout(
        model=family,
        num_layers=4,
        layers=[0, 1, 3],
        sequences=5,
        seq_len=16,
        hidden_size=64,
        dtype="float32",
        shard_sequences=2,
        tokens_sha256=tokens_fingerprint(ids),
    )
    store = HiddenStateStore.open(tmp_path / "store", layout, create=True)
    build_store(store, CheckpointReader(folder), ids, torch.float32, torch.device("cpu"), batch_size=2)
    for layer in (0, 1, 3):
        torch.testing.assert_close(
            store.read_rows(layer, torch.arange(5)), states[layer], atol=1e-5, rtol=1e-5
        )
