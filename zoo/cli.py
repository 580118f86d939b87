"""The `zoo` command: list, info, run, eval, generate, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

#: the recipes ship inside the package (zoo/recipes; `recipes/` at the top of a checkout links to it)
RECIPES_ROOT = Path(__file__).resolve().parent / "recipes"
DEMO_RECIPE = RECIPES_ROOT / "smollm2-135m" / "lolcats-terraced-sink.yaml"


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def cmd_list(args) -> int:
    from zoo.catalog import mixer_catalog

    rows = mixer_catalog()
    width = max(len(row["name"]) for row in rows)
    print(f"{'mixer':<{width}}  {'family':<8}  {'state per sequence':<44}  description")
    for row in rows:
        print(f"{row['name']:<{width}}  {row['family']:<8}  {row['state_size']:<44}  {row['description']}")
    return 0


def cmd_info(args) -> int:
    import torch
    import transformers

    import zoo
    from zoo.teacher import teacher_cache_path

    print("environment")
    print(
        f"  zoo {zoo.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {sys.version.split()[0]}"
    )
    dev = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    print(f"  device: {dev}, threads: {torch.get_num_threads()}")
    print(f"  mixers: {', '.join(zoo.list_mixers())}")
    model, tokenizer = zoo.load_teacher(args.model)
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"teacher {args.model}")
    print(
        f"  {c.model_type}: {c.num_hidden_layers} layers, {c.num_attention_heads} heads, "
        f"{c.num_key_value_heads} KV heads, hidden {c.hidden_size}, vocab {c.vocab_size}, "
        f"{n_params / 1e6:.1f}M parameters"
    )
    if args.model == "smollm2-135m":
        print(f"  cache: {teacher_cache_path(args.model)}")
    from zoo.data import load_corpus

    corpus = load_corpus(args.sources)
    print("corpus")
    print(
        f"  {'source':<10} {'train docs':>10} {'train tokens':>13} {'held-out docs':>13} "
        f"{'held-out tokens':>15}"
    )
    for source, st in corpus.token_stats(tokenizer).items():
        print(
            f"  {source:<10} {st['train_documents']:>10} {st['train_tokens']:>13,} "
            f"{st['heldout_documents']:>13} "
            f"{st['heldout_tokens']:>15,}"
        )
    return 0


def _load_recipe(path: str, overrides: list[str]):
    from zoo.recipe import load_recipe

    return load_recipe(path, overrides)


def print_table(summary: dict) -> None:
    rows = [
        ("teacher", summary.get("ppl_teacher")),
        ("teacher + LoRA (fair ref.)", summary.get("ppl_teacher_lora")),
        ("swap only", summary.get("ppl_swap")),
        ("after stage 1", summary.get("ppl_stage1")),
        ("final (stage 2)", summary.get("ppl_final")),
    ]
    print(
        f"\n{summary['model']} -> {summary['mixer']}  ({summary['trainable_params']:,} trainable parameters, "
        f"{summary['tokens_stage1']:,} + {summary['tokens_stage2']:,} tokens)"
    )
    print(f"{'':<28} {'ppl held-out':>12} {'ppl OOD':>10} {'bpb held-out':>12} {'bpb OOD':>10}")
    rows = [(label, r) for label, r in rows if r is not None]
    for label, r in rows:
        ood = "-" if r["ood"] is None else f"{r['ood']:.2f}"
        bood = "-" if r["bpb_ood"] is None else f"{r['bpb_ood']:.3f}"
        print(f"{label:<28} {r['heldout']:>12.2f} {ood:>10} {r['bpb_heldout']:>12.3f} {bood:>10}")
    sources = list(rows[0][1]["per_source"])
    print("\nper corpus (held-out text), perplexity / bits per byte")
    print(f"{'':<28} " + " ".join(f"{s[-16:]:>16}" for s in sources))
    for label, r in rows:
        cells = [f"{r['per_source'][s]['ppl']:.2f} / {r['per_source'][s]['bpb']:.3f}" for s in sources]
        print(f"{label:<28} " + " ".join(f"{c:>16}" for c in cells))
    if summary.get("mmlu"):
        print(
            "\nMMLU 5-shot accuracy: "
            + ", ".join(f"{k} {v['accuracy']:.3f} (n={v['n']})" for k, v in summary["mmlu"].items())
        )
    generation = summary.get("generation")
    if generation:
        n = generation["final"]
        print(
            f"\nrepeated 4-grams in greedy continuations ({n['prompts']} held-out prompts, {n['new_tokens']} "
            "tokens): " + ", ".join(f"{k} {v['repeated_4grams']:.2f}" for k, v in generation.items())
        )


def print_long_context(summary: dict) -> None:
    """The long-context table of a run's summary, if it has one."""
    table = summary.get("long_context")
    if not table:
        return
    from zoo.long_context import format_table

    print(
        "\nlong context: perplexity by token position on held-out blocks; 'gap closed' is the share of the "
        "gap between the free window (the teacher's own attention cut to the window and sinks, untrained) "
        "and full attention that the model closes (1 = the teacher, 0 = the free window, < 0 = worse)"
    )
    window = table.get("free_window")
    free = f"free window ({window[0]}+{window[1]} sinks)" if window else "free window"
    names = {"free_window": free, "fair_reference": "fair reference", "final": "model"}
    for line in format_table(table, names):
        print(line)


def recipe_and_out(recipe: str, out: str | None) -> tuple[Path, str]:
    """The recipe file and run folder of `zoo run RECIPE [--out DIR]`. RECIPE may be a run folder: its
    recipe.yaml, and the folder itself as --out unless another is given (to fork the run)."""
    path = Path(recipe)
    if path.is_dir():
        if not (path / "recipe.yaml").is_file():
            raise ValueError(
                f"{path} is a folder without recipe.yaml: give a recipe file (recipes/<model>/<mixer>.yaml) "
                "or a run folder"
            )
        return path / "recipe.yaml", out or str(path)
    return path, out or str(Path("runs") / f"{path.parent.name}-{path.stem}")


def cmd_run(args) -> int:
    from zoo.run import run_recipe

    recipe_path, out = recipe_and_out(args.recipe, args.out)
    recipe = _load_recipe(str(recipe_path), args.overrides)
    summary = run_recipe(recipe, out, tuple(args.redo or ()))
    if summary is None:  # a rank other than 0 of a torchrun launch: rank 0 reports
        return 0
    print_table(summary)
    print_long_context(summary)
    for warning in summary.get("warnings") or ():
        print(f"WARNING: {warning}")
    print(f"\ngreedy continuation of {recipe.eval.generate_prompt!r}:")
    if summary.get("teacher_sample") is not None:
        print(f"  teacher: {summary['teacher_sample']!r}")
    print(f"  model:   {summary['sample']!r}")
    print(f"run folder: {out}")
    return 0


#: the demo's budget: a quarter of the recipe's stage-1 tokens, so it finishes in about 20 minutes on 2 CPU
#: cores; and the long-range figure (perplexity at positions 1k-2k beside the teacher and the free window)
DEMO_OVERRIDES = ["stage1.tokens=61440", "eval.long_context=2048", "eval.long_context_blocks=2"]


def cmd_demo(args) -> int:
    args.recipe = str(DEMO_RECIPE)
    args.overrides = DEMO_OVERRIDES + list(args.overrides)
    args.out = args.out or "runs/demo-lolcats"
    return cmd_run(args)


def cmd_eval(args) -> int:
    from zoo.eval_report import evaluate_saved_model

    print(json.dumps(evaluate_saved_model(args), indent=2))
    return 0


def cmd_generate(args) -> int:
    import zoo
    from zoo.generation import generate_text

    folder = Path(args.dir) / "model" if (Path(args.dir) / "model").is_dir() else Path(args.dir)
    model, tokenizer = zoo.load_linearized(folder)
    if tokenizer is None:
        raise SystemExit(f"{folder} has no tokenizer saved with the model")
    print(
        generate_text(
            model,
            tokenizer,
            args.prompt,
            args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature,
        )
    )
    return 0


def _add_redo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redo",
        action="append",
        choices=("stage1", "stage2", "eval"),
        help="redo this stage and what follows it (repeatable); what it replaces is kept in "
        "DIR/superseded/; --redo eval evaluates a finished run again",
    )


def _command_words(argv: list[str]) -> list[str]:
    """The leading command words of `argv` (`bench speed`, `eval`, ...), to import only what they need."""
    words = []
    for arg in argv:
        if arg.startswith("-"):
            break
        words.append(arg)
    return words[:2]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of `argv`'s command. Commands whose arguments live in a heavy module (eval, bench, plan)
    import it only when `argv` names them, so `zoo --help` and `zoo run` start fast."""
    words = _command_words(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="zoo", description="Linearize pretrained LLMs with registered token mixers."
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered mixers").set_defaults(func=cmd_list)
    info = sub.add_parser("info", help="environment, embedded teacher and corpus")
    info.add_argument("--model", default="smollm2-135m")
    info.add_argument("--sources", nargs="+", default=["austen", "bible", "brown"])
    info.set_defaults(func=cmd_info)
    run = sub.add_parser(
        "run", help="run a recipe: RECIPE [key.sub=value ...] [--out DIR]; RECIPE may be a run folder"
    )
    run.add_argument("recipe")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")
    run.add_argument(
        "--out",
        help="run folder (default runs/<recipe folder>-<recipe name>, e.g. runs/smollm2-135m-lola; "
        "a run folder as RECIPE: that folder)",
    )
    _add_redo(run)
    run.set_defaults(func=cmd_run)
    demo = sub.add_parser(
        "demo", help="the lolcats-terraced-sink recipe on the embedded SmolLM2 teacher and corpus"
    )
    demo.add_argument("overrides", nargs="*")
    demo.add_argument("--out")
    _add_redo(demo)
    demo.set_defaults(func=cmd_demo)
    ev = sub.add_parser(
        "eval",
        help="perplexity / bits per byte, MMLU, passkey, decode cost, lm_eval tasks "
        "of a saved linearized model",
    )
    if words[:1] == ["eval"]:
        ev.add_argument("dir")
        ev.add_argument("--sources", nargs="+", default=["austen", "bible", "brown"])
        ev.add_argument("--seq-len", type=int, default=256)
        ev.add_argument("--max-blocks", type=int, default=32)
        ev.add_argument("--mmlu", type=int, default=0, help="number of MMLU questions (0: skip)")
        from zoo.eval_report import add_eval_arguments

        add_eval_arguments(ev)
    ev.set_defaults(func=cmd_eval)
    gen = sub.add_parser("generate", help="generate from a saved linearized model")
    gen.add_argument("dir")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=48)
    gen.add_argument("--sample", action="store_true")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.set_defaults(func=cmd_generate)
    _add_module_commands(sub, words)
    return p


# Commands whose code lives in its own module: each module has add_arguments(parser) and main(args) -> int.
MODULE_COMMANDS = {
    ("bench", "speed"): (
        "zoo.bench.speed",
        "time mixers against softmax attention (prefill, fwd+bwd, decode, memory)",
    ),
    ("bench", "guard"): (
        "zoo.bench.guard",
        "speed regression guard: each mixer's speed-up against SDPA (cpu, T=4096) checked against "
        "docs/speed-guard.json (--record: write it)",
    ),
    ("bench", "generate"): (
        "zoo.bench.generate",
        "whole-model greedy decoding tokens/s by batch and context: a teacher against its linearized forms",
    ),
    ("bench", "gpu"): (
        "zoo.bench.gpu_check",
        "prove the GPU side in one command: gpu tests, speed, a short bf16 run, generation (--dry-run: cpu)",
    ),
    ("bench", "quality"): (
        "zoo.bench.quality",
        "every mixer through one recipe template, one budget: leaderboard",
    ),
    ("plan",): ("zoo.scale.plan", "disk, memory, GPUs and time for block-wise linearization of a model"),
    ("select-layers",): (
        "zoo.layer_select",
        "score each converted layer by the held-out loss it recovers as softmax; choose k to keep",
    ),
}


def _add_module_commands(sub, words: list[str]) -> None:
    """Each module command's parser; its module is imported (for its arguments) only when `words` name it."""
    import importlib

    groups: dict[str, argparse._SubParsersAction] = {}
    for names, (module_name, help_text) in MODULE_COMMANDS.items():
        parent = sub
        if len(names) == 2:
            if names[0] not in groups:
                group = sub.add_parser(names[0], help=f"{names[0]} subcommands")
                groups[names[0]] = group.add_subparsers(dest=f"{names[0]}_command", required=True)
            parent = groups[names[0]]
        parser = parent.add_parser(names[-1], help=help_text)
        if tuple(words[: len(names)]) == names:
            module = importlib.import_module(module_name)
            module.add_arguments(parser)
            parser.set_defaults(func=module.main)


def _raised_in_zoo(err: BaseException) -> bool:
    """Whether the innermost frame of `err`'s traceback is zoo's own code (a deliberate, worded error)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(
        Path(__file__).parent
    )


def expected_error(err: BaseException) -> str | None:
    """One line for a failure the user can act on (bad input, a file problem, a NaN loss); None for a bug."""
    from safetensors import SafetensorError

    if isinstance(err, KeyError):
        return str(err.args[0]) if err.args else "a missing key"
    if isinstance(err, OSError):
        where = f": {err.filename}" if err.filename else ""
        message = f"{err.strerror or err}{where}"
        if err.errno == 28:  # ENOSPC
            message += (
                "; free some space and run the same command again (a run resumes from its last checkpoint)"
            )
        return message
    if isinstance(err, SafetensorError):
        return f"safetensors: {err}" + (
            "; free some space and run the same command again"
            if "StorageFull" in str(err) or "No space" in str(err)
            else ""
        )
    if isinstance(err, ValueError) or (isinstance(err, RuntimeError) and _raised_in_zoo(err)):
        return str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    if args.command != "list":  # the one command that loads no model: it starts without transformers
        _quiet_transformers()
    try:
        from zoo.cpu_memory import requested_policy

        requested_policy()  # ZOO_CPU_ALLOCATOR checked before anything loads
        return args.func(args)
    except KeyboardInterrupt:
        print("zoo: interrupted; the same command resumes from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as err:
        message = expected_error(err)
        if message is None or os.environ.get("ZOO_DEBUG"):
            import traceback

            traceback.print_exc()
            if message is None:
                print(
                    f"zoo: internal error ({type(err).__name__}); this is a bug in zoo, please report it "
                    "with "
                    "the traceback above and the command",
                    file=sys.stderr,
                )
                return 1
        print(f"zoo: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
