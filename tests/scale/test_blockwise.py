"""zoo.scale.blockwise: blocks, seeds, and why a block can train alone (teacher forcing)."""

from __future__ import annotations

import pytest
import torch
from scale_testing import RECIPE, overrides
from zoo_testing import tiny_model

from zoo.cli import main
from zoo.recipe import Recipe
from zoo.scale.blockwise import derived_seed, linearize_layers, plan_blocks
from zoo.scale.skeleton import CheckpointReader, partial_model
from zoo.scale.store import HiddenStateStore, StoreLayout, build_store, tokens_fingerprint
from zoo.transfer.stage1 import transfer_losses


def test_blocks_cover_the_layers_in_order():
    blocks = plan_blocks(126, 9, list(range(126)))
    assert len(blocks) == 14 and [b.start for b in blocks] == list(range(0, 126, 9))
    assert all(b.stop - b.start == 9 for b in blocks)
    ragged = plan_blocks(10, 4, list(range(10)))
    assert [(b.start, b.stop) for b in ragged] == [(0, 4), (4, 8), (8, 10)]
    # blocks without a converted layer are left out; the others train only their converted layers
    partial = plan_blocks(10, 4, [1, 2, 9])
    assert [(b.index, b.converted) for b in partial] == [(0, (1, 2)), (2, (9,))]
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        plan_blocks(10, 0, [0])


def test_seeds_depend_on_seed_kind_and_index_only():
    assert derived_seed(0, "layer", 3) == derived_seed(0, "layer", 3)
    assert (
        len(
            {
                derived_seed(0, "layer", 3),
                derived_seed(1, "layer", 3),
                derived_seed(0, "block", 3),
                derived_seed(0, "layer", 4),
            }
        )
        == 4
    )


@pytest.mark.parametrize("mixer, options", [("hedgehog", {}), ("lolcats", {"window": 4})])
def test_a_block_fed_stored_states_sees_what_the_joint_forward_sees(tmp_path, mixer, options):
    """The key to block-wise transfer: with the teacher forced through every layer, block b's input
    is the teacher's hidden state at its first layer, so a block alone, fed the stored state, has
    exactly the per-layer transfer losses of the whole model's forward."""
    folder = tmp_path / "model"
    whole = tiny_model("llama", num_hidden_layers=4)
    whole.save_pretrained(folder)
    recipe = Recipe.from_dict({"mixer": {"name": mixer, "options": options}})
    ids = torch.randint(3, 128, (3, 24), generator=torch.Generator().manual_seed(1))

    linearize_layers(whole, recipe, range(4))
    joint = transfer_losses(whole, ids)

    blocks = plan_blocks(4, 2, list(range(4)))
    layout = StoreLayout(
        model=str(folder),
        num_layers=4,
        layers=[b.start for b in blocks],
        sequences=3,
        seq_len=24,
        hidden_size=64,
        dtype="float32",
        shard_sequences=2,
        tokens_sha256=tokens_fingerprint(ids),
    )
    store = HiddenStateStore.open(tmp_path / "store", layout, create=True)
    reader = CheckpointReader(folder)
    build_store(store, reader, ids, torch.float32, torch.device("cpu"), batch_size=2)
    for block in blocks:
        alone = partial_model(reader, torch.float32, range(block.start, block.stop), "cpu")
        linearize_layers(alone, recipe, block.converted)
        losses = transfer_losses(alone, None, inputs_embeds=store.read_rows(block.start, torch.arange(3)))
        assert list(losses) == list(block.converted)
        for layer, loss in losses.items():
            torch.testing.assert_close(loss, joint[layer], rtol=1e-4, atol=1e-9, msg=f"layer {layer}")
        # only the block's layers are materialized; the others are pass-through stand-ins on no memory
        held = {i for i, layer in enumerate(alone.model.layers) if any(True for _ in layer.parameters())}
        assert held == set(range(block.start, block.stop))


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"eval.decode_contexts": [64]}, "eval.decode_contexts: decode speed is not measured by block-wise"),
        (
            {"eval.long_context": 512},
            "eval.long_context: the long-context measures are not taken by block-wise",
        ),
        (
            {"stage2.seq_len": 64},
            "stage2.seq_len: block-wise and torchrun runs train every stage at data.seq_len",
        ),
    ],
)
def test_what_distributed_runs_refuse(deep_world, tmp_path, capsys, setting, message):
    args = overrides(deep_world, **setting)
    assert main(["run", RECIPE, *args, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
