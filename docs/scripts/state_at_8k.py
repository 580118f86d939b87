"""Decode-state bytes at an 8,192-token context for every shipped SmolLM2 recipe, against the teacher's KV
cache at the same context (issue 24's target: at most a tenth for every row that claims a constant state).

Each recipe's mixer (its options and layers as the recipe sets them) is put into the embedded SmolLM2-135M
teacher untrained: state sizes do not depend on the weights. One sequence of random tokens is prefilled
to 1,024 and then to 8,192 tokens (zoo.decode_cost.measure_decode, 2 decode steps each), and the state is
counted after each prefill (zoo.decode_cost.cache_state_bytes: every tensor the cache holds).

    python docs/scripts/state_at_8k.py [RECIPE ...] > state_at_8k.json

Results: docs/long-context.md ("State at 8k").
"""

import json
import sys
import time
from pathlib import Path

import torch

import zoo
from zoo.decode_cost import measure_decode
from zoo.recipe import load_recipe
from zoo.teacher import load_teacher

CONTEXTS = (1_024, 8_192)
RECIPES = Path(zoo.__file__).parent / "recipes" / "smollm2-135m"


def measure(name: str | None) -> dict:
    model, _ = load_teacher("smollm2-135m")
    if name is not None:
        recipe = load_recipe(RECIPES / f"{name}.yaml")
        zoo.linearize(model, recipe.mixer.name, recipe.mixer.layers, **recipe.mixer_options())
    start = time.perf_counter()
    out = measure_decode(model.eval(), CONTEXTS, steps=2)
    return {
        "recipe": name or "teacher",
        "state_bytes": {c: row["state_bytes"] for c, row in out["contexts"].items()},
        "growth": out["state_growth"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(names: list[str]) -> None:
    torch.manual_seed(0)
    names = names or sorted(p.stem for p in RECIPES.glob("*.yaml") if p.stem not in ("bench", "softmax"))
    rows = [measure(None)]
    teacher = rows[0]["state_bytes"]["8192"]
    print(json.dumps(rows[0]), file=sys.stderr)
    for name in names:
        row = measure(name)
        row["share_of_teacher_kv_at_8k"] = round(row["state_bytes"]["8192"] / teacher, 4)
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
