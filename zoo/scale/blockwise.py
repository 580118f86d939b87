"""Block-wise attention transfer: each block of k layers trains its mixers alone, from the teacher's
hidden states entering it (the store), and blocks are spread over the ranks of a torchrun launch.

Why this is exact: in stage 1 the teacher is frozen and teacher-forced (each converted layer passes
the teacher's attention output on), so the input of block b is the teacher's hidden state at layer
b*k whatever the mixers do, and a block's loss (the sum of its layers' transfer MSE) depends on its
own mixers only. So blocks train independently, in any order, on any rank.

Determinism: a layer's initial mixer is drawn from a seed of (recipe seed, layer), a block trains
under a seed of (recipe seed, block), and the batches follow the recipe seed, as in a joint run.
So a block's result does not depend on which rank trains it or how many ranks there are, and the
stitched model of a 2-rank launch equals that of a 1-rank launch.

Files, under the run folder::

    blocks/block-003/checkpoints/stage1-block003/   train_loop's checkpoints (resume mid-block)
    blocks/block-003/metrics.jsonl                  the block's loss rows
    blocks/block-003/done/                          mixers.safetensors + result.json, written
                                                    atomically when the block finishes; a finished
                                                    block is never trained again
    stage1/mixers.safetensors                       every block's mixers stitched (rank 0)
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from zoo.atomic import atomic_dir, atomic_file
from zoo.recipe import Recipe
from zoo.scale.skeleton import CheckpointReader, partial_model, skeleton
from zoo.scale.store import HiddenStateStore

STITCHED = Path("stage1") / "mixers.safetensors"


def derived_seed(seed: int, kind: str, index: int) -> int:
    """A seed for one layer or block, a function of (recipe seed, kind, index) only."""
    return int(hashlib.sha256(f"{seed}:{kind}:{index}".encode()).hexdigest()[:8], 16)


@dataclass(frozen=True)
class Block:
    """Block `index`: decoder layers [start, stop), of which `converted` get a mixer."""

    index: int
    start: int
    stop: int
    converted: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"block-{self.index:03d}"


def plan_blocks(num_layers: int, block_size: int, converted: list[int]) -> list[Block]:
    """Blocks of `block_size` consecutive layers (the last may be shorter) that hold a converted layer."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    blocks = []
    for index, start in enumerate(range(0, num_layers, block_size)):
        stop = min(num_layers, start + block_size)
        mine = tuple(i for i in converted if start <= i < stop)
        if mine:
            blocks.append(Block(index, start, stop, mine))
    return blocks


def linearize_layers(model: nn.Module, recipe: Recipe, layers) -> None:
    """Convert `layers` one at a time, each mixer initialized under its own (seed, layer) seed."""
    import zoo

    for layer in layers:
        torch.manual_seed(derived_seed(recipe.seed, "layer", layer))
        zoo.linearize(model, recipe.mixer.name, layers=[layer], **recipe.mixer_options())


def mixer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The mixers' parameters by their state-dict names (model.layers.<i>.self_attn.mixer.*)."""
    return {
        name: t.detach().cpu().contiguous() for name, t in model.state_dict().items() if ".mixer." in name
    }


def mixer_names(folder: Path, recipe: Recipe, converted: list[int]) -> list[str]:
    """The mixer parameter names a full conversion has (built on the meta device: no memory)."""
    model = skeleton(folder, torch.float32)
    with torch.device("meta"):
        linearize_layers(model, recipe, converted)
    return sorted(name for name, _ in model.named_parameters() if ".mixer." in name)


def block_done(out: Path, block: Block) -> bool:
    return (out / "blocks" / block.name / "done" / "result.json").is_file()


def train_block(
    block: Block,
    recipe: Recipe,
    reader: CheckpointReader,
    store: HiddenStateStore,
    out: Path,
    dtype: torch.dtype,
    device: torch.device,
) -> dict:
    """Train one block's mixers from its stored inputs; write blocks/<name>/done/ atomically."""
    from zoo.transfer.stage1 import run_stage1

    s1 = recipe.stage1
    model = partial_model(reader, dtype, range(block.start, block.converted[-1] + 1), device)
    linearize_layers(model, recipe, block.converted)
    folder = out / "blocks" / block.name
    torch.manual_seed(derived_seed(recipe.seed, "block", block.index))
    stats = run_stage1(
        model,
        store.inputs(block.start),
        s1.loop(f"stage1-{block.name}", recipe.seed),
        folder,
        attention_ce=s1.attention_ce,
        attention_ce_max_len=s1.attention_ce_max_len,
        device=device,
    )
    result = {
        "block": block.index,
        "layers": [block.start, block.stop],
        "converted": list(block.converted),
        "train": stats,
    }
    with atomic_dir(folder / "done") as tmp:
        save_file(mixer_state(model), str(tmp / "mixers.safetensors"))
        (tmp / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def train_blocks(
    blocks: list[Block],
    recipe: Recipe,
    reader: CheckpointReader,
    store: HiddenStateStore,
    out: Path,
    dtype: torch.dtype,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> list[int]:
    """Train this rank's unfinished blocks (block i goes to rank i % world); returns those trained."""
    trained = []
    for position, block in enumerate(blocks):
        if position % world != rank:
            continue
        if block_done(out, block):
            print(
                f"zoo: stage 1: {block.name} (layers {block.start}-{block.stop - 1}) is done; not trained "
                "again",
                file=sys.stderr,
                flush=True,
            )
            continue
        print(
            f"zoo: stage 1: rank {rank} trains {block.name} (layers {block.start}-{block.stop - 1})",
            file=sys.stderr,
            flush=True,
        )
        train_block(block, recipe, reader, store, out, dtype, device)
        trained.append(block.index)
    return trained


def stitch(blocks: list[Block], out: Path, expected: list[str]) -> dict:
    """Merge every block's mixers into stage1/mixers.safetensors and the blocks' loss rows into the
    run's metrics.jsonl; returns stage 1's totals (tokens per block, summed seconds and final losses)."""
    merged: dict[str, torch.Tensor] = {}
    results, rows = [], []
    for block in blocks:
        done = out / "blocks" / block.name / "done"
        merged.update(load_file(str(done / "mixers.safetensors")))
        results.append(json.loads((done / "result.json").read_text()))
        metrics = out / "blocks" / block.name / "metrics.jsonl"
        rows += metrics.read_text().splitlines() if metrics.exists() else []
    if sorted(merged) != sorted(expected):
        lacking = sorted(set(expected) - set(merged))
        raise RuntimeError(
            f"stitching stage 1: the blocks' mixers lack {lacking[:5]} and have "
            f"{sorted(set(merged) - set(expected))[:5]} too many"
        )
    with atomic_dir(out / STITCHED.parent) as tmp:
        save_file(merged, str(tmp / STITCHED.name))
        (tmp / "blocks.json").write_text(json.dumps(results, indent=2) + "\n")
    run_metrics = out / "metrics.jsonl"
    kept = [
        line
        for line in (run_metrics.read_text().splitlines() if run_metrics.exists() else [])
        if line.strip() and not json.loads(line).get("stage", "").startswith("stage1-block")
    ]
    with atomic_file(run_metrics) as f:
        f.write("".join(line + "\n" for line in kept + rows if line.strip()))
    finals = [r["train"]["final_loss"] for r in results]
    return {
        "tokens": max(r["train"]["tokens"] for r in results),
        "seconds": sum(r["train"]["seconds"] for r in results),
        "final_loss": sum(finals) if None not in finals else None,
        "blocks": len(results),
    }
