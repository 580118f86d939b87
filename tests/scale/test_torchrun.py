"""`torchrun --nproc-per-node 2 -m zoo.cli run` on the CPU (gloo): block-wise stage 1 spread over two
ranks gives the stitched mixers of one process; FSDP2 LoRA (distilled) on two ranks gives one process's
losses;
a killed rank's work is redone on relaunch, finished blocks are not."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from scale_testing import overrides, torchrun


def stage_losses(run, stage: str) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["stage"] == stage]


def assert_same_tensors(a: dict, b: dict, atol=0.0, rtol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=rtol, msg=key)


@pytest.fixture(scope="module")
def runs(deep_world, tmp_path_factory):
    """The same recipe (4 blocks of 1 layer of lolcats, stage 2 distilled from the fair reference, with
    gradient checkpointing, the fair reference, MMLU, passkey, generation repeats and the branch ablation)
    on 1 and on 2 ranks, each with its own cache (each computes the teacher's side and the reference)."""
    root = tmp_path_factory.mktemp("torchrun")
    args = overrides(
        deep_world,
        **{
            "stage2.gradient_checkpointing": True,
            "stage2.distill": 0.5,
            "eval.mmlu": 4,
            "stage2.distill_from": "reference",
            "eval.teacher_lora": True,
            "eval.branches": True,
            "mixer.name": "lolcats",
            "mixer.options": {"window": 8},
            "eval.passkey_lengths": [256, 320],
            "eval.passkey_trials": 2,
            "eval.generation_prompts": 2,
            "eval.generation_tokens": 8,
        },
    )
    done = {}
    for n in (1, 2):
        result = torchrun(n, args, root / f"ranks{n}", root / f"cache{n}")
        assert result.returncode == 0, result.stderr[-3000:]
        done[n] = root / f"ranks{n}"
        done[f"stderr{n}"] = result.stderr
    return {"args": args, "root": root, **done}


def test_measures_on_two_ranks_match_one_process(runs):
    """MMLU, passkey and generation repeats of the teacher and the final model, taken on the sharded
    models with both ranks in step, are one process's."""
    s1, s2 = (json.loads((runs[n] / "summary.json").read_text()) for n in (1, 2))
    assert s1["mmlu"]["teacher"]["n"] == s1["mmlu"]["final"]["n"] == 4
    assert set(s1["passkey"]["final"]["lengths"]) == {"256", "320"}
    assert s1["generation"]["final"]["prompts"] == 2 and s1["generation"]["final"]["new_tokens"] == 8
    for name in ("mmlu", "passkey", "generation"):
        assert s2[name] == s1[name], name
    for n in (1, 2):
        assert runs[f"stderr{n}"].count("teacher: mmlu (computed once, then cached)") == 1


def test_the_fair_reference_and_branches_on_two_ranks_match_one_process(runs):
    """Distributed runs take the evals one-process runs take (decode speed alone is refused)."""
    s1, s2 = (json.loads((runs[n] / "summary.json").read_text()) for n in (1, 2))
    for n, s in ((1, s1), (2, s2)):
        assert "fair reference: fine-tuning the teacher" in runs[f"stderr{n}"]
        assert s["ppl_teacher_lora"]["heldout"] > 1 and set(s["branches"]) == {"window", "linear"}
    assert s2["ppl_teacher_lora"]["heldout"] == pytest.approx(s1["ppl_teacher_lora"]["heldout"], rel=1e-5)
    for branch in ("window", "linear"):
        assert s2["branches"][branch]["ppl"]["heldout"] == pytest.approx(
            s1["branches"][branch]["ppl"]["heldout"], rel=1e-5
        )


def test_two_ranks_stitch_the_mixers_of_one(runs):
    one, two = runs[1], runs[2]
    assert_same_tensors(
        load_file(str(one / "stage1" / "mixers.safetensors")),
        load_file(str(two / "stage1" / "mixers.safetensors")),
    )
    blocks = json.loads((two / "stage1" / "blocks.json").read_text())
    assert [b["block"] for b in blocks] == [0, 1, 2, 3]
    for n in (1, 2):
        stages = {json.loads(line)["stage"] for line in (runs[n] / "metrics.jsonl").read_text().splitlines()}
        assert {f"stage1-block-00{i}" for i in range(4)} | {"stage2"} <= stages
        assert json.loads((runs[n] / "summary.json").read_text())["processes"] == n
    # the store: the input of each of the 4 blocks for the 12 sequences stage 1 reads, in shards of 4
    assert len(list((two / "store").glob("layer-*/shard-*.safetensors"))) == 4 * 3
    assert json.loads((two / "store" / "index.json").read_text())["sequences"] == 12


def test_fsdp2_lora_on_two_ranks_matches_one_process(runs):
    one, two = stage_losses(runs[1], "stage2"), stage_losses(runs[2], "stage2")
    assert len(one) == len(two) == 6
    for n in (1, 2):  # the loss is distilled: the teacher ran inside the sharded model, LoRA off
        rows = [json.loads(line) for line in (runs[n] / "metrics.jsonl").read_text().splitlines()]
        assert all(r["kl"] > 0 for r in rows if r["stage"] == "stage2")
    assert two == pytest.approx(one, rel=1e-5)
    assert_same_tensors(
        load_file(str(runs[1] / "model" / "model.safetensors")),
        load_file(str(runs[2] / "model" / "model.safetensors")),
        atol=1e-6,
        rtol=1e-5,
    )
    s1, s2 = (json.loads((runs[n] / "summary.json").read_text()) for n in (1, 2))
    assert s2["ppl_final"]["heldout"] == pytest.approx(s1["ppl_final"]["heldout"], rel=1e-5)
    assert s2["ppl_teacher"]["heldout"] == pytest.approx(s1["ppl_teacher"]["heldout"], rel=1e-6)


def test_killed_rank_is_relaunched_without_redoing_finished_blocks(runs):
    args, out, cache = runs["args"], runs["root"] / "killed", runs["root"] / "cache2"
    # rank 0 trains blocks 0 and 2, rank 1 blocks 1 and 3: rank 0 dies after 2 steps of block 2
    killed = torchrun(2, args, out, cache, {"ZOO_FAULT_KILL_AT": "stage1-block-002:2"})
    assert killed.returncode != 0
    finished = {
        d.parent.name: (d / "result.json").stat().st_mtime_ns for d in (out / "blocks").glob("*/done")
    }
    assert "block-000" in finished and "block-002" not in finished
    store = {f: f.stat().st_mtime_ns for f in (out / "store").glob("layer-*/*.safetensors")}

    # relaunched, it dies again, in stage 2 (both ranks), after stage 1 is complete
    again = torchrun(2, args, out, cache, {"ZOO_FAULT_KILL_AT": "stage2:3"})
    assert again.returncode != 0, again.stderr[-3000:]
    for name in finished:
        assert f"{name} (layers" in again.stderr and "is done; not trained again" in again.stderr
        assert (out / "blocks" / name / "done" / "result.json").stat().st_mtime_ns == finished[name], name
    assert "stage1-block-002: resuming from step 2/6" in again.stderr
    assert all(f.stat().st_mtime_ns == t for f, t in store.items())  # no shard written twice
    assert (out / "stage1" / "mixers.safetensors").is_file() and not (out / "summary.json").exists()

    last = torchrun(2, args, out, cache)
    assert last.returncode == 0, last.stderr[-3000:]
    assert "stage2: resuming from step 2/6" in last.stderr and "trains block" not in last.stderr
    assert_same_tensors(
        load_file(str(runs[2] / "stage1" / "mixers.safetensors")),
        load_file(str(out / "stage1" / "mixers.safetensors")),
    )
    assert stage_losses(out, "stage2") == pytest.approx(stage_losses(runs[2], "stage2"), rel=1e-6)
    assert_same_tensors(
        load_file(str(runs[2] / "model" / "model.safetensors")),
        load_file(str(out / "model" / "model.safetensors")),
        atol=1e-7,
        rtol=1e-6,
    )
