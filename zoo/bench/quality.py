"""`zoo bench quality`: every mixer through one recipe template and one budget, then a leaderboard.

Each mixer's recipe is the template (default `recipes/<model>/bench.yaml`, a file of its own so that
tuning a mixer's recipe moves no bench) with that mixer's own settings taken from its recipe (the
`mixer` section, the stage-1 optimizer, `STAGE1_KEYS`, and whether the mixer keeps learning in stage 2,
`STAGE2_KEYS`): `<mixer>.yaml` in the recipes folder when it
is a recipe for that mixer, else the one recipe there that is (so `lolcats.yaml` may run the terraced
window while `bench.yaml` carries the plain lolcats); a mixer without one runs with its default
options. Then come the budget's overrides
(zoo.bench.budgets), then `--set` overrides. So every mixer, and the fair reference, gets the same
data, stage-2 budget and evaluation. Each runs through `zoo.run.run_recipe` in DIR/<mixer>/: a mixer
finished there (summary.json) is not redone, an interrupted one resumes where it stopped.

Ablations (`--ablations`, default all):
- `lora-only`: for each mixer of `--lora-only-mixers` (default lolcats), no attention transfer, LoRA
  and the mixer's parameters trained on the next-token loss for the same total tokens (DIR/ablations/);
- `feature-maps`: hedgehog, t2r and linear-elu run under the same budget (added if not in --mixers);
- `branches`: each hybrid's trained model evaluated with its window branch alone and its linear branch alone;
- `softmax-layers`: for each mixer of `--softmax-layers-mixers` (default lolcats-terraced-sink), the same run
  with k = 1, 2 and 4 evenly spaced layers kept as softmax (zoo.layer_select.evenly_spaced; to keep the
  layers `zoo select-layers` chooses instead, run the recipe with the `mixer.layers` it prints).

Outputs in DIR, rewritten after every run: results.json (zoo.bench.results), leaderboard.md
(zoo.bench.leaderboard) and PNG plots (zoo.bench.quality_plots). They cover this invocation's runs
and the finished rows earlier ones left in DIR, so `--mixers` subsets run one after another into one
folder make one leaderboard.
"""

from __future__ import annotations

import gc
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from zoo.bench import split_names
from zoo.bench.budgets import BUDGETS, Budget, get_budget
from zoo.recipe import Recipe, load_recipe

__all__ = [
    "ABLATIONS",
    "STAGE1_KEYS",
    "STAGE2_KEYS",
    "BenchItem",
    "add_arguments",
    "main",
    "mixer_recipe",
    "own_recipe",
    "plan_bench",
    "run_bench",
]

ABLATIONS = ("lora-only", "feature-maps", "branches", "softmax-layers")
#: softmax layers kept by the softmax-layers ablation
SOFTMAX_LAYER_COUNTS = (1, 2, 4)
SOFTMAX_LAYERS_DEFAULT = "lolcats-terraced-sink"
FEATURE_MAP_MIXERS = ("hedgehog", "t2r", "linear-elu")
#: stage-1 keys a mixer's own recipe contributes besides its `mixer` section
STAGE1_KEYS = (
    "lr",
    "lr_schedule",
    "adam_betas",
    "weight_decay",
    "grad_clip",
    "attention_ce",
    "attention_ce_max_len",
)
#: stage-2 keys of a mixer's own recipe that its bench run takes: only those that leave the fair reference
#: (the teacher + the same LoRA, zoo.reference.teacher_lora_folder) as it is, so one reference still serves
#: every mixer
STAGE2_KEYS = ("train_mixer",)
RECIPES_ROOT = Path(__file__).resolve().parents[1] / "recipes"  # shipped in the package
DEFAULT_RECIPES = "smollm2-135m"
TEMPLATE_FILE = "bench.yaml"
LORA_ONLY_DEFAULT = "lolcats"


def _say(msg: str) -> None:
    print(f"zoo bench: {msg}", file=sys.stderr, flush=True)


@dataclass
class BenchItem:
    """One run of the bench: a mixer, or an ablation of one."""

    name: str  # the row's name
    mixer: str
    kind: str  # "mixer" or "ablation"
    ablation: str | None
    recipe: Recipe
    folder: Path

    @property
    def finished(self) -> bool:
        return (self.folder / "summary.json").is_file()


# ---------------------------------------------------------------------------------------- plan


def resolve_mixers(names: list[str] | None) -> list[str]:
    """Registered mixer names from `--mixers` (names or comma lists; none or "all": every registered one)."""
    import zoo

    registered = zoo.list_mixers()
    wanted = split_names(names) or []
    if not wanted or wanted == ["all"]:
        return registered
    unknown = [n for n in wanted if n not in registered]
    if unknown:
        raise ValueError(f"unknown mixer(s) {unknown}; registered mixers: {', '.join(registered)}")
    return wanted


def parse_ablations(text: str) -> list[str]:
    """`--ablations`: "all", "none", or a comma list of ABLATIONS."""
    if text.strip() == "all":
        return list(ABLATIONS)
    if text.strip() == "none":
        return []
    chosen = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in chosen if a not in ABLATIONS]
    if unknown:
        raise ValueError(
            f"unknown ablation(s) {unknown}; allowed: all, none, or a comma list of {', '.join(ABLATIONS)}"
        )
    return chosen


def recipes_folder(model: str, given: str | None) -> Path:
    """`--recipes`, else recipes/<model>/ when it exists, else the SmolLM2 recipes (their mixer settings)."""
    if given:
        folder = Path(given)
        if not folder.is_dir():
            raise FileNotFoundError(f"--recipes {given}: no such folder")
        return folder
    own = RECIPES_ROOT / model  # an embedded name such as smollm2-135m; hub ids and folders have none
    return own if "/" not in model and own.is_dir() else RECIPES_ROOT / DEFAULT_RECIPES


def template_path(recipes: Path, given: str | None) -> Path:
    """`--template`, else <recipes>/bench.yaml."""
    if given:
        return Path(given)
    path = recipes / TEMPLATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{recipes} has no {TEMPLATE_FILE} (the recipe every mixer of the bench starts from); "
            "add one or name one with --template"
        )
    return path


def _mixer_named_in(path: Path) -> str | None:
    """The mixer a YAML file is a recipe for (None for YAML that is not a recipe)."""
    raw = yaml.safe_load(path.read_text())
    section = raw.get("mixer") if isinstance(raw, dict) else None
    return section.get("name") if isinstance(section, dict) else None


def own_recipe(mixer: str, recipes: Path) -> Path | None:
    """The recipe in `recipes` holding `mixer`'s own settings: <mixer>.yaml when it is a recipe for that
    mixer, else the one recipe there that is; None when none is. Two candidates are an error."""
    candidates = [p for p in sorted(recipes.glob("*.yaml")) if _mixer_named_in(p) == mixer]
    named = recipes / f"{mixer}.yaml"
    if named in candidates:
        return named
    if len(candidates) > 1:
        raise ValueError(
            f"several recipes in {recipes} are for mixer {mixer!r} "
            f"({', '.join(p.name for p in candidates)}); rename the one the bench should take {mixer}.yaml"
        )
    return candidates[0] if candidates else None


def mixer_recipe(
    template: Recipe,
    mixer: str,
    recipes: Path,
    model: str,
    budget: Budget,
    settings: list[str],
    branches: bool = False,
) -> Recipe:
    """The template with `mixer`'s own settings (from its recipe in `recipes`, `own_recipe`), the
    model, the budget and `settings` (key=value) applied, in that order."""
    raw = template.to_dict()
    own = own_recipe(mixer, recipes)
    if own is not None:
        mine = load_recipe(own).to_dict()
        raw["mixer"] = mine["mixer"]
        raw["stage1"] |= {k: mine["stage1"][k] for k in STAGE1_KEYS}
        raw["stage2"] |= {k: mine["stage2"][k] for k in STAGE2_KEYS}
    else:
        raw["mixer"] = {"name": mixer, "options": {}, "layers": raw["mixer"]["layers"]}
    raw["model"]["name"] = model
    recipe = Recipe.from_dict(raw, budget.recipe_overrides())
    if settings:
        recipe = recipe.override(settings)
    return recipe.override({"eval.branches": True}) if branches else recipe


def lora_only_recipe(recipe: Recipe) -> Recipe:
    """No attention transfer: LoRA and the mixer's own parameters on the next-token loss, for the
    tokens of both stages; measured against the bench's shared references (decode cost is the mixer's)."""
    return recipe.override(
        {
            "stage1.enabled": False,
            "stage2.tokens": recipe.stage1.tokens + recipe.stage2.tokens,
            "stage2.train_mixer": True,
            "eval.teacher_lora": False,
            "eval.branches": False,
            "eval.decode_contexts": [],
        }
    )


def softmax_layer_items(base: BenchItem, out: Path, num_layers: int) -> list[BenchItem]:
    """`base` with k of its model's `num_layers` layers kept as softmax, evenly spaced, for each k of
    SOFTMAX_LAYER_COUNTS (those below `num_layers`)."""
    from zoo.layer_select import evenly_spaced, linearized_complement

    items = []
    for k in (k for k in SOFTMAX_LAYER_COUNTS if k < num_layers):
        kept = evenly_spaced(num_layers, k)
        recipe = base.recipe.override({"mixer.layers": linearized_complement(num_layers, kept)})
        name = f"{base.mixer} [softmax layers {','.join(map(str, kept))}]"
        items.append(
            BenchItem(
                name,
                base.mixer,
                "ablation",
                f"softmax-layers-{k}",
                recipe,
                out / "ablations" / f"{base.mixer}-softmax-{k}",
            )
        )
    return items


def plan_bench(
    model: str,
    mixers: list[str],
    budget: Budget,
    out: Path,
    ablations: list[str],
    lora_only_mixers: list[str],
    recipes: Path,
    template: Recipe,
    settings: list[str],
    softmax_layers_mixers: list[str] = (),
) -> list[BenchItem]:
    """The runs of a bench, in order: the mixers, feature-map mixers the ablation adds, LoRA-only runs."""
    from zoo.mixers import get_mixer

    def item(mixer: str, kind: str, ablation: str | None) -> BenchItem:
        hybrid = "branches" in ablations and hasattr(get_mixer(mixer), "BRANCHES")
        recipe = mixer_recipe(template, mixer, recipes, model, budget, settings, branches=hybrid)
        return BenchItem(mixer, mixer, kind, ablation, recipe, out / mixer)

    items = [item(m, "mixer", None) for m in mixers]
    if "feature-maps" in ablations:
        items += [item(m, "ablation", "feature-map") for m in FEATURE_MAP_MIXERS if m not in mixers]
    if "lora-only" in ablations:
        for m in lora_only_mixers:
            if m not in mixers:
                _say(f"LoRA-only ablation of {m} skipped: {m} is not among the bench's mixers")
                continue
            base = next(i for i in items if i.mixer == m)
            items.append(
                BenchItem(
                    f"{m} [LoRA only]",
                    m,
                    "ablation",
                    "lora-only",
                    lora_only_recipe(base.recipe),
                    out / "ablations" / f"{m}-lora-only",
                )
            )
    if "softmax-layers" in ablations:
        items += _softmax_layer_ablation(model, items, mixers, softmax_layers_mixers, out)
    return items


def _softmax_layer_ablation(model, items, mixers, chosen, out) -> list[BenchItem]:
    from zoo.preflight import model_facts

    added = []
    for m in chosen:
        if m not in mixers:
            _say(f"softmax-layers ablation of {m} skipped: {m} is not among the bench's mixers")
            continue
        base = next(i for i in items if i.mixer == m and i.kind == "mixer")
        added += softmax_layer_items(base, out, model_facts(model).num_layers)
    return added


def check_folders(items: list[BenchItem]) -> None:
    """A folder in DIR that holds a run of another recipe is an error (another budget or --set)."""
    from zoo.run import same_recipe

    for it in items:
        path = it.folder / "recipe.yaml"
        if path.exists() and not same_recipe(path, it.recipe):
            raise ValueError(
                f"{it.folder} holds a run of another recipe (another budget, --set or template?); "
                "use another --out or remove that folder"
            )


def check_recipes(items: list[BenchItem]) -> None:
    """Every run's recipe passes the checks `zoo run` makes before loading anything (the model family and
    layers, each mixer's options, the data sources), so a bad one stops the bench before any run starts."""
    from zoo.preflight import check_run

    for it in items:
        try:
            check_run(it.recipe)
        except ValueError as err:
            raise ValueError(f"{it.name}: {err}") from None


# ----------------------------------------------------------------------------------------- run


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_bench(items: list[BenchItem], budget: Budget, on_progress=None, jobs: int = 1) -> dict[str, str]:
    """Run every unfinished item (the finished are not redone); returns {name: error} of those that
    failed. `on_progress(failures)` is called after each run (the bench rewrites its outputs there).
    With jobs > 1, the first unfinished run goes alone (it computes the references every run shares and
    caches them), then the rest run `jobs` at a time in worker processes, the CPU threads split among them."""
    for index, it in enumerate(items, 1):
        if it.finished:
            _say(f"[{index}/{len(items)}] {it.name}: already finished in {it.folder}, not redone")
    todo = [it for it in items if not it.finished]
    alone = todo if jobs == 1 else todo[:1]
    failures: dict[str, str] = {}
    started, took = time.time(), []
    for it in alone:
        tag = f"[{items.index(it) + 1}/{len(items)}] {it.name}"
        left = len(todo) - len(took)
        if took:
            eta, basis = sum(took) / len(took) * left, "runs so far"
        else:
            eta = budget.estimate_seconds() * left / min(jobs, left)
            basis = "budget estimate for SmolLM2 on 2 CPU cores"
        state = "resuming" if (it.folder / "progress.json").exists() else "starting"
        _say(
            f"{tag}: {state} in {it.folder} (bench {_clock(time.time() - started)} so far; "
            f"ETA {_clock(eta)} for {left} run(s) left, {basis})"
        )
        t0 = time.time()
        error = _run_item(it.recipe, it.folder)
        if error:  # one mixer's failure (a NaN loss, a bad option) must not sink the bench
            failures[it.name] = error
            _say(f"{tag}: FAILED ({error}); going on with the next")
        took.append(time.time() - t0)
        _release_memory()
        if on_progress is not None:
            on_progress(failures)
    if todo[len(alone) :]:
        _run_parallel(todo[len(alone) :], jobs, failures, on_progress, started)
    return failures


def _release_memory() -> None:
    """After a run in this process: free what it left, and hand the GPU memory torch's allocator still
    holds back to the device, or the worker processes started next (--jobs) find too little of it
    (seen on an H100: while workers ran out of memory, one process, by its PID the bench's own, held
    22 GB)."""
    gc.collect()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _run_item(recipe: Recipe, folder: Path, threads: int | None = None) -> str | None:
    """Run one recipe into `folder`; the error as text, or None. A worker process's entry point too."""
    from zoo.run import run_recipe

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        run_recipe(recipe, folder)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def _run_parallel(
    items: list[BenchItem], jobs: int, failures: dict[str, str], on_progress, started: float
) -> None:
    """`items` in `jobs` spawned worker processes, one CPU thread share each."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    _say(f"{len(items)} run(s) left, {jobs} at a time ({threads} thread(s) each)")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        running = {pool.submit(_run_item, it.recipe, it.folder, threads): it for it in items}
        for done, future in enumerate(as_completed(running), 1):
            it = running[future]
            try:
                error = future.result()
            except Exception as err:  # the worker itself died (out of memory, a signal)
                error = f"{type(err).__name__}: {err}"
            if error:
                failures[it.name] = error
            _say(
                f"{it.name}: {'FAILED (' + error + ')' if error else 'finished'} in {it.folder} "
                f"({done}/{len(items)} of the parallel runs; bench {_clock(time.time() - started)} so far)"
            )
            if on_progress is not None:
                on_progress(failures)


# ------------------------------------------------------------------------------------- outputs


def device_description(recipe: Recipe) -> str:
    from zoo.devices import describe_device, pick_device

    return describe_device(pick_device(recipe.device))


def collect_rows(items: list[BenchItem], out: Path, failures: dict[str, str]) -> list[dict]:
    """results.json rows: the references, then each item's (see zoo.bench.results)."""
    import json

    from zoo.bench.results import empty_row, failed_row, mixer_rows, reference_rows
    from zoo.mixers import get_mixer
    from zoo.reference import teacher_lora_folder

    summaries = {it.name: json.loads((it.folder / "summary.json").read_text()) for it in items if it.finished}
    with_reference = next((it for it in items if it.name in summaries and it.recipe.eval.teacher_lora), None)
    rows, references = [], {}
    if with_reference is not None:
        summary = summaries[with_reference.name]
        references = {"teacher": summary.get("ppl_teacher"), "fair": summary.get("ppl_teacher_lora")}
        rows += reference_rows(summary, teacher_lora_folder(with_reference.recipe)[0] / "metrics.jsonl")
    for it in items:
        family = get_mixer(it.mixer).family
        relative = str(it.folder.relative_to(out)) if it.folder.is_relative_to(out) else str(it.folder)
        if it.name in summaries:
            rows += mixer_rows(
                summaries[it.name], it.name, it.kind, family, it.ablation, it.folder, references, out
            )
        elif it.name in failures:
            rows.append(
                failed_row(it.name, it.kind, it.mixer, family, it.ablation, failures[it.name], relative)
            )
        else:
            rows.append(
                empty_row(it.name, it.kind, it.mixer, family, it.ablation)
                | {"status": "pending", "run_dir": relative}
            )
    return rows


def earlier_results(out: Path, meta: dict) -> dict | None:
    """DIR's results.json, if any; one holding finished rows of another model or budget is an error (one
    folder, one bench; budget fields added since it was written are not a difference)."""
    import json

    path = out / "results.json"
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    finished = any(r["kind"] != "reference" and r.get("status") == "done" for r in old.get("rows", []))
    budget, old_budget = json.loads(json.dumps(meta["budget"])), old.get("budget") or {}
    same_budget = all(old_budget[k] == budget[k] for k in old_budget.keys() & budget.keys())
    if finished and (old.get("model") != meta["model"] or not same_budget):
        raise ValueError(
            f"{out} holds a bench of another model or budget ({old.get('model')}, budget "
            f"{old_budget.get('name')}); use another --out"
        )
    return old


def earlier_rows(out: Path, meta: dict, rows: list[dict]) -> tuple[list[dict], list[str]]:
    """The finished rows an earlier invocation wrote into DIR's results.json (other `--mixers`, same model
    and budget, `earlier_results`) that this one does not plan, and the commands that made them: kept, so
    a bench grown one subset at a time keeps one leaderboard. A row whose run folder no longer holds a
    summary is dropped."""
    from zoo.bench.results import ROW_FIELDS

    old = earlier_results(out, meta)
    if old is None:
        return [], []
    planned = {r["name"] for r in rows}
    kept = [
        dict.fromkeys(ROW_FIELDS) | r
        for r in old.get("rows", [])  # fields added since: None
        if r["name"] not in planned
        and r.get("status") == "done"
        and (r["kind"] == "reference" or (out / str(r.get("run_dir")) / "summary.json").is_file())
    ]
    if not any(r["kind"] != "reference" for r in kept):
        return [], []
    commands = [
        c for c in old.get("earlier_commands", []) + [old.get("command")] if c and c != meta["command"]
    ]
    return kept, list(dict.fromkeys(commands))


def write_outputs(out: Path, meta: dict, items: list[BenchItem], failures: dict[str, str]) -> dict:
    """results.json, leaderboard.md and the plots, from what DIR holds now (with the rows earlier
    invocations left there, `earlier_rows`)."""
    from zoo.atomic import atomic_file, write_json
    from zoo.bench.leaderboard import leaderboard_markdown
    from zoo.bench.quality_plots import write_plots

    rows = collect_rows(items, out, failures)
    kept, commands = earlier_rows(out, meta, rows)
    rows = sorted(rows + kept, key=lambda r: r["kind"] != "reference")  # stable: the references first
    results = meta | {
        "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "earlier_commands": commands,
        "rows": rows,
    }
    write_json(out / "results.json", results)
    with atomic_file(out / "leaderboard.md") as f:
        f.write(leaderboard_markdown(results))
    write_plots(results["rows"], out, f"{meta['model']}, budget {meta['budget']['name']}")
    return results


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model", default="smollm2-135m", help="teacher: smollm2-135m, a hub id or a local folder"
    )
    parser.add_argument(
        "--mixers", nargs="+", help="mixers to bench (names or comma lists; default: all registered)"
    )
    parser.add_argument(
        "--budget",
        default="quick",
        help=f"a named budget ({', '.join(BUDGETS)}) or a YAML file of budget fields (default quick)",
    )
    parser.add_argument("--out", help="bench folder (default runs/bench-quality-<model>-<budget>)")
    parser.add_argument(
        "--ablations", default="all", help=f"all (default), none, or a comma list of {', '.join(ABLATIONS)}"
    )
    parser.add_argument(
        "--lora-only-mixers",
        default=LORA_ONLY_DEFAULT,
        help=f"comma list of mixers for the LoRA-only ablation (default {LORA_ONLY_DEFAULT})",
    )
    parser.add_argument(
        "--softmax-layers-mixers",
        default=SOFTMAX_LAYERS_DEFAULT,
        help=f"comma list of mixers for the softmax-layers ablation (default {SOFTMAX_LAYERS_DEFAULT})",
    )
    parser.add_argument(
        "--recipes", help="folder of per-mixer recipes (default recipes/<model>, else the SmolLM2 ones)"
    )
    parser.add_argument(
        "--template", help=f"the recipe every mixer starts from (default <recipes>/{TEMPLATE_FILE})"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time, each in its own process with a share of the CPU threads (default 1); "
        "on a GPU they share its memory, and a run that finds too little fails and is redone "
        "by the next invocation",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="run nothing: write results.json, leaderboard.md and the plots from what DIR holds "
        "(unfinished runs show as pending)",
    )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for every run, after the budget (e.g. device=cpu); repeatable",
    )


def command_line(args, mixers: list[str], out: Path) -> str:
    """The command that reproduces this bench (canonical form of the arguments)."""
    parts = [
        "zoo",
        "bench",
        "quality",
        "--model",
        args.model,
        "--mixers",
        ",".join(mixers),
        "--budget",
        args.budget,
        "--out",
        str(out),
        "--ablations",
        args.ablations,
        "--lora-only-mixers",
        args.lora_only_mixers,
        "--softmax-layers-mixers",
        args.softmax_layers_mixers,
    ]
    if args.jobs > 1:
        parts += ["--jobs", str(args.jobs)]
    for flag, value in (("--recipes", args.recipes), ("--template", args.template)):
        if value:
            parts += [flag, value]
    for setting in args.settings:
        parts += ["--set", setting]
    return shlex.join(parts)


def main(args) -> int:
    from zoo.devices import versions

    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    budget = get_budget(args.budget)
    mixers = resolve_mixers(args.mixers)
    ablations = parse_ablations(args.ablations)
    lora_only = resolve_mixers([args.lora_only_mixers]) if args.lora_only_mixers.strip() else []
    softmax_layers = (
        resolve_mixers([args.softmax_layers_mixers]) if args.softmax_layers_mixers.strip() else []
    )
    recipes = recipes_folder(args.model, args.recipes)
    template = load_recipe(template_path(recipes, args.template))
    slug = Path(args.model).name if Path(args.model).exists() else args.model.replace("/", "-")
    out = Path(args.out or Path("runs") / f"bench-quality-{slug}-{budget.name}")
    items = plan_bench(
        args.model,
        mixers,
        budget,
        out,
        ablations,
        lora_only,
        recipes,
        template,
        args.settings,
        softmax_layers,
    )
    check_folders(items)
    check_recipes(items)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "bench": "quality",
        "model": args.model,
        "budget": budget.to_dict(),
        "seed": items[0].recipe.seed,
        "device": device_description(items[0].recipe),
        "versions": versions() | {"python": platform.python_version(), "platform": platform.platform()},
        "command": command_line(args, mixers, out),
        "argv": sys.argv,
        "mixers": mixers,
        "ablations": ablations,
        "recipes": str(recipes),
    }
    earlier_results(out, meta)  # a folder of another bench is an error before anything runs
    if args.report:
        write_outputs(out, meta, items, {})
        _say(
            f"{sum(it.finished for it in items)} of {len(items)} run(s) finished in {out}; wrote "
            "results.json, "
            "leaderboard.md and the plots (ran nothing)"
        )
        return 0
    _say(f"{len(items)} run(s) into {out}: budget {budget.name} ({budget.description})")
    failures = run_bench(
        items, budget, on_progress=lambda failed: write_outputs(out, meta, items, failed), jobs=args.jobs
    )
    results = write_outputs(out, meta, items, failures)
    done = sum(r["status"] == "done" for r in results["rows"] if r["kind"] != "reference")
    _say(
        f"{done} row(s) done, {len(failures)} failed; wrote {out / 'results.json'}, {out / 'leaderboard.md'} "
        "and the plots"
    )
    return 1 if failures else 0
