"""`zoo run RECIPE`: teacher eval, conversion, stage 1, stage 2, evals, save. One folder per run:
recipe.yaml (resolved), metrics.jsonl, checkpoints/, model/, progress.json, summary.json.

Every phase's result is written to progress.json as soon as it is known, and each stage checkpoints
atomically, so a run killed anywhere and started again with the same command carries on from
where it was and ends with the same result.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from zoo.atomic import write_json
from zoo.faults import fault_point
from zoo.measures import branch_ablation, cached_reference, measure, teacher_measures, wanted_measures
from zoo.peak_memory import PeakMemory
from zoo.recipe import Recipe, Stage2Config, load_recipe
from zoo.run_state import RunState, open_run
from zoo.transfer.loop import CheckpointError

FINAL_MODEL_DIR = "model"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for, but no CUDA device is available; use device=cpu or auto")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """The device in words, as results record it: "cuda (NVIDIA H100 80GB HBM3)", "cpu (x86_64, 2 threads)"."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({platform.machine()}, {torch.get_num_threads()} threads)"


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def pooled(per_source: dict[str, dict]) -> dict:
    """Token-weighted perplexity and bits per byte over several sources."""
    tokens = sum(r["tokens"] for r in per_source.values())
    if not tokens:
        return {"ppl": float("nan"), "bpb": float("nan"), "tokens": 0}
    nll = sum(math.log(r["ppl"]) * r["tokens"] for r in per_source.values())
    bpb = sum(r["bpb"] * r["tokens"] for r in per_source.values()) / tokens
    return {"ppl": math.exp(nll / tokens), "bpb": bpb, "tokens": tokens}


class RunData:
    """The run's corpus, training blocks and held-out evaluation sets (in-domain and out-of-domain)."""

    def __init__(self, recipe: Recipe, tokenizer):
        from zoo.data import load_corpus, token_blocks

        d = recipe.data
        overlap = sorted(set(d.train) & set(d.eval_ood))
        if overlap:
            raise ValueError(f"data.eval_ood must be corpora never trained on, but {overlap} is also in data.train")
        # a source that fails is an error, unless the recipe says data.skip_unavailable
        self.corpus = load_corpus(list(d.train) + list(d.eval_ood), heldout_fraction=d.heldout_fraction, seed=d.seed,
                                  strict=not d.skip_unavailable)
        self.train_sources = [s for s in d.train if s in self.corpus.sources]
        self.ood_sources = [s for s in d.eval_ood if s in self.corpus.sources]
        self.skipped_sources = [s for s in [*d.train, *d.eval_ood] if s not in self.corpus.sources]
        if not self.train_sources:
            raise ValueError(f"none of the training sources {list(d.train)} could be loaded")
        train_docs = [doc for s in self.train_sources for doc in self.corpus.train(s)]
        self.train_blocks = token_blocks(tokenizer, train_docs, d.seq_len)
        self.tokenizer = tokenizer
        self.recipe = recipe

    def evaluate(self, model) -> dict:
        from zoo.evaluate import evaluate_corpus

        e = self.recipe.eval
        per = evaluate_corpus(model, self.tokenizer, self.corpus, self.train_sources + self.ood_sources,
                              self.recipe.data.seq_len, e.max_blocks)
        return {"heldout": pooled({s: per[s] for s in self.train_sources}),
                "ood": pooled({s: per[s] for s in self.ood_sources}) if self.ood_sources else None,
                "per_source": per}

    def generation_documents(self) -> list:
        """Held-out documents of the training corpora, taking each corpus in turn: the prompts to continue."""
        by_source = [self.corpus.heldout(s) for s in self.train_sources]
        return [docs[i] for i in range(max(map(len, by_source), default=0)) for docs in by_source if i < len(docs)]

    def passkey_filler(self) -> list:
        """Held-out documents to hide passkeys in: the out-of-domain corpora's, else the training corpora's."""
        return [doc for s in (self.ood_sources or self.train_sources) for doc in self.corpus.heldout(s)]


def _say(msg: str) -> None:
    print(f"zoo: {msg}", file=sys.stderr, flush=True)


REFERENCE_STAGE2_KEYS = ("tokens", "batch_size", "lr", "weight_decay", "grad_clip", "lr_schedule", "lora")
#: stage-2 keys added later that change the fine-tuned teacher: in the cache key only when set away from their
#: default, so references cached before the key existed stay valid
REFERENCE_STAGE2_KEYS_IF_SET = ("adam_betas",)


def teacher_lora_folder(recipe: Recipe) -> tuple[Path, str]:
    """Where the fair reference of `recipe` is kept (one per model, data, stage 2, eval blocks, seed), and its key."""
    from zoo.data.cache import cache_dir

    d = recipe.to_dict()
    # only what changes the fine-tuned teacher: new recipe keys (logging, memory savers) must not void the cache
    stage2 = {k: d["stage2"][k] for k in REFERENCE_STAGE2_KEYS}
    default = Stage2Config()
    stage2 |= {k: d["stage2"][k] for k in REFERENCE_STAGE2_KEYS_IF_SET if d["stage2"][k] != getattr(default, k)}
    key_src = json.dumps({"model": d["model"], "data": recipe.data_key(), "seed": d["seed"]}
                         | {"stage2": stage2, "eval": d["eval"]["max_blocks"]},
                         sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    return cache_dir() / "references" / f"teacher-lora-{key}", key_src


def teacher_lora_reference(recipe: Recipe, data: RunData, device, dtype) -> dict:
    """The fair reference: the teacher fine-tuned with the same LoRA budget on the same data.
    Computed once per (model, data, stage 2, eval, seed) and reused from the zoo cache."""
    from zoo.teacher import load_teacher
    from zoo.transfer.stage2 import add_lora, run_stage2

    folder, key_src = teacher_lora_folder(recipe)
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    _say("fair reference: fine-tuning the teacher with the same LoRA budget (computed once, then cached)")
    torch.manual_seed(recipe.seed)
    teacher, _ = load_teacher(recipe.model.name, dtype=dtype, device=str(device))
    s2 = recipe.stage2
    teacher = add_lora(teacher, s2.lora.rank, s2.lora.alpha, s2.lora.dropout, s2.lora.targets)
    with PeakMemory() as peak:
        stats = run_stage2(teacher, data.train_blocks, s2.loop("teacher_lora", recipe.seed), folder, device)
    stats |= {"peak_memory": peak.result(),
              "trainable_params": sum(p.numel() for p in teacher.parameters() if p.requires_grad)}
    result = {"eval": data.evaluate(teacher), "train": stats, "recipe_key": json.loads(key_src)}
    write_json(result_path, result)
    return result


def teacher_lora_weights(recipe: Recipe, data: RunData, device, dtype) -> dict[str, torch.Tensor]:
    """The fair reference's LoRA tensors, by parameter name (the reference is computed first if the
    cache lacks it): what stage 2 distills from with stage2.distill_from=reference."""
    from safetensors.torch import load_file

    teacher_lora_reference(recipe, data, device, dtype)
    folder, _ = teacher_lora_folder(recipe)
    return load_file(str(folder / "checkpoints" / "teacher_lora" / "trainable.safetensors"), device=str(device))


def run_recipe(recipe: Recipe, out_dir: str | Path, redo: tuple[str, ...] = ()) -> dict | None:
    """Run a whole recipe into `out_dir` (resuming what is there). Returns the summary dict.

    Everything cheap is checked first (zoo.preflight); then the folder is claimed (zoo.run_state: one
    writer, stage-by-stage reuse, `redo`), and a finished run returns its summary without loading anything.
    A recipe with stage1.blockwise.block_size > 0, or any recipe in a process started by torchrun,
    runs through zoo.scale.pipeline (block-wise stage 1, FSDP2 stage 2); there only rank 0 returns
    the summary and the other ranks None."""
    from zoo.preflight import check_run
    from zoo.scale.dist import launched_by_torchrun

    out = Path(out_dir)
    _, warnings = check_run(recipe, out)
    for warning in warnings:
        _say(warning)
    if recipe.stage1.blockwise.block_size or launched_by_torchrun():
        from zoo.scale.pipeline import run_scaled

        return run_scaled(recipe, out, redo)
    with open_run(recipe, out, redo) as state:
        if state.finished_summary is not None:
            _say(f"{out} is a finished run: its summary follows (--redo eval evaluates it again)")
            return state.finished_summary
        try:
            return _run_claimed(recipe, state)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; redo that stage with: {state.redo_command(err.stage)}", err.stage) from None


def _run_claimed(recipe: Recipe, state: RunState) -> dict:
    import zoo
    from zoo.transfer.stage1 import layer_mse, run_stage1
    from zoo.transfer.stage2 import add_lora, enable_gradient_checkpointing, run_stage2

    out, progress, remember = state.out, state.progress, state.remember
    device = pick_device(recipe.device)
    dtype = pick_dtype(recipe.model.dtype, device)
    torch.manual_seed(recipe.seed)
    t_start = time.time()
    model, tokenizer = zoo.load_teacher(recipe.model.name, dtype=dtype, device=str(device))
    data = RunData(recipe, tokenizer)
    _say(f"{data.train_blocks.shape[0]} training blocks of {recipe.data.seq_len} tokens from {data.train_sources}; "
         f"out-of-domain: {data.ood_sources or 'none'}")

    model_params = sum(p.numel() for p in model.parameters())
    if "teacher" not in progress:
        _say("evaluating the teacher")
        teacher_key = {"model": recipe.to_dict()["model"], "data": recipe.data_key(),
                       "max_blocks": recipe.eval.max_blocks, "device": device.type}
        remember("teacher", cached_reference("teacher-eval", teacher_key, lambda: data.evaluate(model)))
    if recipe.eval.teacher_lora and "teacher_lora" not in progress:
        reference = teacher_lora_reference(recipe, data, device, dtype)
        remember("teacher_lora_train", reference["train"])
        remember("teacher_lora", reference["eval"])
    teacher_side = teacher_measures(recipe, data, model, tokenizer, device,
                                    [m for m in wanted_measures(recipe) if m not in progress])

    torch.manual_seed(recipe.seed)  # the mixers' initialization is part of the run's determinism
    zoo.linearize(model, recipe.mixer.name, layers=recipe.mixer.layers, **recipe.mixer.options)
    mse_blocks = data.train_blocks[: min(recipe.eval.mse_blocks, data.train_blocks.shape[0])]
    if "swap" not in progress:
        _say(f"evaluating the swapped model ({recipe.mixer.name}, untrained)")
        remember("swap", data.evaluate(model) | {"layer_mse": layer_mse(model, mse_blocks)})

    s1 = recipe.stage1
    has_mixer_params = any(".mixer." in n for n, _ in model.named_parameters())
    if s1.enabled and s1.tokens > 0 and not has_mixer_params:
        _say(f"stage 1 skipped: {recipe.mixer.name} has no parameters to transfer")
    elif s1.enabled and s1.tokens > 0:
        with PeakMemory() as peak:
            stats = run_stage1(model, data.train_blocks, s1.loop("stage1", recipe.seed), out,
                               attention_ce=s1.attention_ce, attention_ce_max_len=s1.attention_ce_max_len,
                               device=device)
        if "stage1_train" not in progress:
            remember("stage1_train", stats | {"peak_memory": peak.result()})
        if "stage1" not in progress:
            remember("stage1", {**data.evaluate(model), "layer_mse": layer_mse(model, mse_blocks)})
        warn_if_stage1_worse(progress)

    s2 = recipe.stage2
    trainable = sum(p.numel() for n, p in model.named_parameters() if ".mixer." in n)
    if s2.enabled and s2.tokens > 0:
        torch.manual_seed(recipe.seed + 1)  # LoRA's random init must not depend on what ran before it
        model = add_lora(model, s2.lora.rank, s2.lora.alpha, s2.lora.dropout, s2.lora.targets, s2.train_mixer)
        if s2.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) + (
            0 if s2.train_mixer else trainable)
        # before the peak-memory window: computing a missing reference is not stage 2's memory
        reference = (teacher_lora_weights(recipe, data, device, dtype)
                     if s2.distill and s2.distill_from == "reference" else None)
        with PeakMemory() as peak:
            stats = run_stage2(model, data.train_blocks, s2.loop("stage2", recipe.seed), out, device=device,
                               distill=s2.distill, teacher_lora=reference)
        if "stage2_train" not in progress:
            remember("stage2_train", stats | {"peak_memory": peak.result()})
    if "final" not in progress:
        remember("final", data.evaluate(model))
    for name in ("mmlu", "passkey", "generation"):
        if name in teacher_side:
            _say(f"{name}: final model")
            remember(name, {"teacher": teacher_side[name], "final": measure(name, recipe, data, model, tokenizer)})
    if recipe.eval.branches and "branches" not in progress:
        remember("branches", branch_ablation(recipe, data, model, tokenizer))

    sample = generate_text(model, tokenizer, recipe.eval.generate_prompt, recipe.eval.generate_tokens, device)
    save_run_model(model, tokenizer, out, merge=s2.merge_on_save)
    if "decode" in teacher_side:  # timed on the model as saved (LoRA merged), not through the peft wrapper
        del model
        saved, _ = zoo.load_linearized(out / FINAL_MODEL_DIR, dtype=dtype, device=str(device))
        _say("decode speed and state memory: final model")
        remember("decode", {"teacher": teacher_side["decode"], "final": measure("decode", recipe, data, saved, tokenizer)})
    summary = build_summary(recipe, progress, trainable, sample, time.time() - t_start, model_params)
    summary["data_sources"] = {"train": data.train_sources, "eval_ood": data.ood_sources,
                               "skipped": data.skipped_sources}
    write_json(out / "summary.json", summary)
    fault_point("summary")
    return summary


def stage1_worse_than_swap(progress: dict) -> str | None:
    """A warning when stage 1 ended with a higher held-out perplexity than the untrained swap (None otherwise)."""
    swap, stage1 = progress.get("swap"), progress.get("stage1")
    if not (swap and stage1 and "heldout" in swap and "heldout" in stage1):
        return None
    before, after = swap["heldout"]["ppl"], stage1["heldout"]["ppl"]
    if after > before:
        return (f"stage 1 ended worse than the untrained swap (held-out perplexity {after:.2f} > {before:.2f}): "
                "its training hurt; try a lower stage1.lr or more stage1.tokens")
    return None


def warn_if_stage1_worse(progress: dict) -> None:
    warning = stage1_worse_than_swap(progress)
    if warning:
        _say(f"WARNING: {warning}")


def same_recipe(path: Path, recipe: Recipe) -> bool:
    """Whether the run folder's recipe.yaml is `recipe` (keys added to the schema since take their defaults)."""
    try:
        return load_recipe(path).to_dict() == recipe.to_dict()
    except ValueError:
        return False


def save_run_model(model, tokenizer, out: Path, merge: bool) -> None:
    """model/ holds the linearized model; with merge off, LoRA stays apart in adapter/."""
    import zoo

    if hasattr(model, "peft_config") and not merge:
        model.save_pretrained(out / "adapter")
        model = model.unload()
    zoo.save_linearized(model, tokenizer, out / FINAL_MODEL_DIR, merge=True)


def _ppl_pair(entry: dict | None) -> dict | None:
    if entry is None:
        return None
    return {"heldout": entry["heldout"]["ppl"], "ood": entry["ood"]["ppl"] if entry.get("ood") else None,
            "bpb_heldout": entry["heldout"]["bpb"], "bpb_ood": entry["ood"]["bpb"] if entry.get("ood") else None,
            "per_source": {s: {"ppl": r["ppl"], "bpb": r["bpb"]} for s, r in entry["per_source"].items()}}


def _mean(values: dict | None) -> float | None:
    return sum(values.values()) / len(values) if values else None


def _branches(entry: dict | None) -> dict | None:
    if entry is None:
        return None
    return {branch: {"ppl": _ppl_pair(r), "passkey": r.get("passkey")} for branch, r in entry.items()}


def build_summary(recipe: Recipe, progress: dict, trainable: int, sample: str, wall: float,
                  model_params: int | None = None) -> dict:
    s1 = progress.get("stage1_train") or {}
    s2 = progress.get("stage2_train") or {}
    return {
        "model": recipe.model.name,
        "mixer": recipe.mixer.name,
        "mixer_options": recipe.mixer.options,
        "ppl_teacher": _ppl_pair(progress.get("teacher")),
        "ppl_teacher_lora": _ppl_pair(progress.get("teacher_lora")),
        "ppl_swap": _ppl_pair(progress.get("swap")),
        "ppl_stage1": _ppl_pair(progress.get("stage1")),
        "ppl_final": _ppl_pair(progress.get("final")),
        "layer_mse_swap": progress.get("swap", {}).get("layer_mse"),
        "layer_mse_stage1": progress.get("stage1", {}).get("layer_mse"),
        "mean_layer_mse_swap": _mean(progress.get("swap", {}).get("layer_mse")),
        "mean_layer_mse_stage1": _mean(progress.get("stage1", {}).get("layer_mse")),
        "trainable_params": trainable,
        "model_params": model_params,
        "trainable_percent": 100.0 * trainable / model_params if model_params else None,
        "teacher_lora_train": progress.get("teacher_lora_train"),
        "tokens_stage1": s1.get("tokens", 0),
        "tokens_stage2": s2.get("tokens", 0),
        "seconds_stage1": s1.get("seconds", 0.0),
        "seconds_stage2": s2.get("seconds", 0.0),
        "seconds_wall_last_invocation": wall,
        "peak_memory_stage1": s1.get("peak_memory"),
        "peak_memory_stage2": s2.get("peak_memory"),
        "final_loss_stage1": s1.get("final_loss"),
        "final_loss_stage2": s2.get("final_loss"),
        "mmlu": {k: {"accuracy": v["accuracy"], "n": v["n"]} for k, v in progress["mmlu"].items()}
        if "mmlu" in progress else None,
        "passkey": progress.get("passkey"),
        "decode": progress.get("decode"),
        "generation": progress.get("generation"),
        "warnings": [w for w in (stage1_worse_than_swap(progress),) if w],
        "branches": _branches(progress.get("branches")),
        "prompt": recipe.eval.generate_prompt,
        "sample": sample,
        "seed": recipe.seed,
        "device": describe_device(pick_device(recipe.device)),
        "versions": versions(),
    }


def versions() -> dict:
    import transformers

    import zoo

    return {"zoo": zoo.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 32, device="cpu", do_sample: bool = False,
                  temperature: float = 1.0) -> str:
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                         temperature=temperature if do_sample else None, top_p=None, top_k=None,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
