"""Everything about a run that can be checked in seconds, checked before anything heavy loads.

`check_run(recipe, out)` reads the model's config.json (not its weights), then checks the model family,
the converted layers, the mixer's name and options (each layer's mixer is built on the meta device, so
every option check a mixer makes runs, with no memory), the data specs and the `--out` folder. A bad
recipe fails here with one line naming the key, and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from zoo.families import EMBEDDED_CONFIGS, SUPPORTED_FAMILIES
from zoo.recipe import Recipe, RecipeError


@dataclass(frozen=True)
class ModelFacts:
    """What a run needs to know of the teacher before loading it."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    hidden_size: int
    head_dim: int


def _is_hub_id(name: str) -> bool:
    """owner/name, as the hub spells its repositories."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def read_model_config(name: str) -> dict:
    """The config.json of `name` (an embedded teacher, a local folder or a hub id) as a dict."""
    if name in EMBEDDED_CONFIGS:
        return EMBEDDED_CONFIGS[name]
    path = Path(os.path.expanduser(name))
    if path.exists():
        config = path / "config.json" if path.is_dir() else path
        if not config.is_file():
            raise RecipeError(
                f"model.name: {name} is a folder without config.json, not a saved model", key="model.name"
            )
        return _read_json(config)
    if not _is_hub_id(name):
        raise RecipeError(
            f"model.name: no model folder at {name}, and not a hub id of the form owner/name "
            f"(nor an embedded teacher: {', '.join(EMBEDDED_CONFIGS)})",
            key="model.name",
        )
    try:
        from huggingface_hub import hf_hub_download

        return _read_json(Path(hf_hub_download(name, "config.json")))
    except Exception as err:  # offline, unknown repo, gated: say so in one line
        raise RecipeError(
            f"model.name: could not read the config.json of hub model {name} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
            key="model.name",
        ) from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RecipeError(f"model.name: {path} is not readable JSON ({err})", key="model.name") from None


def model_facts(name: str) -> ModelFacts:
    """The model's family and attention shape, from its config.json; an unconvertible family is an error."""
    config = read_model_config(name)
    model_type = str(config.get("model_type"))
    family = model_type.removeprefix("zoo_")
    if family not in SUPPORTED_FAMILIES:
        raise RecipeError(
            f"model.name: {name} is a {model_type!r} model, which zoo cannot convert; supported "
            f"families: {', '.join(SUPPORTED_FAMILIES)}",
            key="model.name",
        )
    try:
        heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
        return ModelFacts(
            model_type=family,
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            hidden_size=hidden,
            head_dim=int(config.get("head_dim") or hidden // heads),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise RecipeError(
            f"model.name: the config.json of {name} lacks a usable {err}", key="model.name"
        ) from None


def check_mixer(recipe: Recipe, facts: ModelFacts) -> list[int]:
    """The converted layers; the mixer of the first one built on the meta device with the recipe's
    options (each converted layer gets the same options, so one build checks them all)."""
    import torch

    from zoo.mixers import get_mixer

    try:
        layers = recipe.mixer.layer_indices(facts.num_layers)
    except ValueError as err:
        raise RecipeError(f"mixer.layers: {err}", key="mixer.layers") from None
    try:
        cls = get_mixer(recipe.mixer.name)
    except KeyError as err:
        raise RecipeError(f"mixer.name: {err.args[0]}", key="mixer.name") from None
    try:
        with torch.device("meta"):
            cls(
                facts.num_heads,
                facts.num_kv_heads,
                facts.head_dim,
                facts.hidden_size,
                layers[0],
                **recipe.mixer_options(),
            )
    except (ValueError, TypeError) as err:
        message = str(err)
        where = "" if message.startswith("mixer.options") else "mixer.options: "
        raise RecipeError(f"{where}{message}", key="mixer.options") from None
    return layers


def check_data(recipe: Recipe) -> list[str]:
    """Problems of the data specs. Each is an error, unless data.skip_unavailable makes it a warning
    (returned, for the run to print)."""
    from zoo.data.corpus import spec_problem
    from zoo.data.retrieval import PREFIX, parse_retrieval_spec

    d = recipe.data
    overlap = sorted(set(d.train) & set(d.eval_ood))
    fillers = {
        spec: parse_retrieval_spec(spec)[0]
        for spec in d.train
        if spec.startswith(PREFIX) and spec_problem(spec) is None
    }
    leaking = sorted(spec for spec, source in fillers.items() if source in d.eval_ood)
    if leaking:
        raise RecipeError(
            f"data.train {leaking} hide keys in the text of an out-of-domain corpus: data.eval_ood must be "
            "corpora never trained on",
            key="data.train",
        )
    if overlap:
        raise RecipeError(
            f"data.eval_ood must be corpora never trained on, but {overlap} is also in data.train",
            key="data.eval_ood",
        )
    problems = [
        (key, spec_problem(spec))
        for key, specs in (("data.train", d.train), ("data.eval_ood", d.eval_ood))
        for spec in specs
    ]
    problems = [(key, problem) for key, problem in problems if problem is not None]
    if problems and not d.skip_unavailable:
        key, problem = problems[0]
        raise RecipeError(f"{key}: {problem} (data.skip_unavailable=true skips a source that fails)", key=key)
    if sum(key == "data.train" for key, _ in problems) == len(d.train):
        raise RecipeError(f"data.train: none of {list(d.train)} can be loaded", key="data.train")
    return [f"{key}: skipping {problem}" for key, problem in problems]


def check_device(recipe: Recipe) -> None:
    import torch

    if recipe.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError(
            "device: cuda was asked for, but no CUDA device is available; use device=cpu or auto",
            key="device",
        )


def check_run(recipe: Recipe, out: Path | None = None) -> tuple[ModelFacts, list[str]]:
    """All the cheap checks of a run of `recipe` into `out`, in the order a user fixes them. Returns the
    model facts and the warnings to print (skipped data specs)."""
    from zoo.run_folder import check_out_folder

    if out is not None:
        check_out_folder(Path(out))
    facts = model_facts(recipe.model.name)
    check_mixer(recipe, facts)
    warnings = check_data(recipe)
    check_device(recipe)
    return facts, warnings
