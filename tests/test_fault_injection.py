"""A tiny run killed with SIGKILL at seeded random points across stage 1, stage 2, the save and the
evaluations, and started again each time, ends byte-identical to a run never interrupted."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from zoo_testing import RECIPE, ForkedZoo, tiny_overrides

KILLS = 10
SEED = 2026
#: summary fields that time the run or the machine, not its results
TIMINGS = {
    "seconds_stage1",
    "seconds_stage2",
    "seconds_wall_last_invocation",
    "peak_memory_stage1",
    "peak_memory_stage2",
    "teacher_lora_train",
}


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path_factory.getbasetemp() / "zoo-cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def results(out: Path) -> tuple[bytes, dict, list]:
    summary = {k: v for k, v in json.loads((out / "summary.json").read_text()).items() if k not in TIMINGS}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    return (out / "model" / "model.safetensors").read_bytes(), summary, rows


def test_killed_at_ten_random_points_and_restarted_ends_as_if_never_killed(tiny_world, tmp_path):
    args = [
        "run",
        RECIPE,
        *tiny_overrides(tiny_world, "lolcats", **{"mixer.options": {"window": 8}}),
        "--out",
    ]
    trace = tmp_path / "trace.txt"
    zoo = ForkedZoo(tmp_path / "logs")  # each run a fresh process, forked without paying the imports again
    code, log = zoo.run([*args, str(tmp_path / "straight")], {"ZOO_FAULT_TRACE": str(trace)})
    assert code == 0, log[-2000:]
    points = trace.read_text().split()
    phases = {p.split(":")[0] for p in points}
    assert {"stage1", "stage2", "write", "swap", "progress", "summary"} <= phases, phases
    chosen = sorted(random.Random(SEED).sample(range(len(points)), KILLS))
    picked = [points[i] for i in chosen]
    where = {
        "stage1" if "stage1" in p else "stage2" if "stage2" in p else "save and evaluation" for p in picked
    }
    assert where == {"stage1", "stage2", "save and evaluation"}, (
        picked
    )  # the seed spreads the kills over all three

    out = tmp_path / "killed"
    for point in picked:
        code, log = zoo.run([*args, str(out)], {"ZOO_FAULT_KILL_AT": point})
        assert code == -9, f"not killed at {point}: {log[-1500:]}"
    code, log = zoo.run([*args, str(out)])
    assert code == 0, log[-2000:]

    model_a, summary_a, rows_a = results(tmp_path / "straight")
    model_b, summary_b, rows_b = results(out)
    assert model_a == model_b, f"the model differs after kills at {picked}"
    assert summary_a == summary_b
    assert rows_a == rows_b  # no duplicated or lost metrics rows
    litter = [p for p in out.rglob("*") if p.name.startswith((".zoo-tmp.", ".zoo-old."))]
    assert not litter, litter
